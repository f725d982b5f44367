-- Usage: {items, device bytes, application bytes, tenant bytes}, after the sweep.
return {n, dev_bytes, app_bytes, tenant_bytes}
