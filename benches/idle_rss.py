#!/usr/bin/env python3
"""Broker memory per idle, authenticated, subscribed connection, on the embedded node.

Starts `lorabroker dev` on free loopback ports with a known API key, opens N MQTT
connections (CONNECT with the key, one SUBSCRIBE to one device's topics each), waits, and
prints the growth of the broker's RSS divided by N. Needs `ulimit -n` above N.

    cargo build --release && python3 benches/idle_rss.py target/release/lorabroker 10000
    RUST_LOG=info python3 benches/idle_rss.py target/release/lorabroker 10000   # with spans

PRE="valgrind --tool=massif" WAIT=20 runs the broker under a heap profiler instead: that,
the embedded node and the log level are what this script is for. Idle memory over TCP,
TLS, WebSocket and WSS, next to Mosquitto's, is measured by `benches/transports.sh`
(the load generator's `idle` scenario, `lorabroker-load --transport …`).
"""
import socket, struct, sys, time, os, base64, subprocess, signal

def rl(n):
    out = b''
    while True:
        b = n % 128; n //= 128
        if n: b |= 0x80
        out += bytes([b])
        if not n: return out

def s16(b): return struct.pack('>H', len(b)) + b

def connect_pkt(cid, user, pw, ka=0):
    vh = s16(b'MQTT') + b'\x04' + b'\xc2' + struct.pack('>H', ka)
    pl = s16(cid) + s16(user) + s16(pw)
    body = vh + pl
    return b'\x10' + rl(len(body)) + body

def sub_pkt(pid, topic):
    body = struct.pack('>H', pid) + s16(topic) + b'\x00'
    return b'\x82' + rl(len(body)) + body

def recvn(s, n):
    d = b''
    while len(d) < n:
        c = s.recv(n - len(d))
        if not c: raise Exception('closed')
        d += c
    return d

def rss(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])

binary, n = sys.argv[1], int(sys.argv[2])
import socket as _s
def free():
    x=_s.socket(); x.bind(('127.0.0.1',0)); p=x.getsockname()[1]; x.close(); return p

def open_idle(port, user, key):
    """N connections, each CONNECTed and SUBSCRIBEd; returns them and the time taken."""
    socks = []
    t0 = time.time()
    for i in range(n):
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(connect_pkt(f'idle-{i}'.encode(), user, key.encode()))
        ack = recvn(s, 4)
        assert ack[3] == 0, ack
        s.sendall(sub_pkt(1, f'v3/demo/devices/dev{i}/#'.encode()))
        sa = recvn(s, 5)
        assert sa[4] == 0, sa
        socks.append(s)
    return socks, time.time() - t0

def measure(name, pid, port, user, key):
    base = rss(pid)
    socks, took = open_idle(port, user, key)
    time.sleep(2)
    after = rss(pid)
    print(f'{name}: {n} conns in {took:.1f}s; RSS {base} KiB -> {after} KiB; {(after-base)*1024/n:.0f} bytes/conn', flush=True)
    for s in socks:
        s.close()

port = free(); hport = free()
key = 'NNSXS.' + base64.b32encode(os.urandom(24)).decode().rstrip('=') + '.' + base64.b32encode(os.urandom(32)).decode().rstrip('=')
env = dict(os.environ, RUST_LOG=os.environ.get('RUST_LOG', 'warn'))
# All N connections come from one address with one key: rate limits and connection quotas
# off, as benches/compare.sh does.
for limit in ['ACCEPTS_PER_IP__PER_SECOND', 'CONNECTS_PER_KEY__PER_SECOND',
              'SUBSCRIBES_PER_CONNECTION__PER_SECOND', 'MAX_CONNECTIONS_PER_APPLICATION',
              'MAX_CONNECTIONS_PER_KEY', 'MAX_CONNECTIONS_PER_TENANT']:
    env.setdefault('LORABROKER_LIMITS__' + limit, '0')
pre = os.environ.get('PRE','').split()
cmd = pre + [binary, 'dev', '--mqtt-listen', f'127.0.0.1:{port}', '--http-listen', f'127.0.0.1:{hport}',
             '--devices', '1', '--uplink-interval', '1h', '--api-key', key]
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
try:
    time.sleep(float(os.environ.get('WAIT','1.5')))
    measure(binary, p.pid, port, b'demo', key)
finally:
    p.send_signal(signal.SIGINT if pre else signal.SIGKILL); time.sleep(float(os.environ.get('WAIT','0')))
    p.wait()
