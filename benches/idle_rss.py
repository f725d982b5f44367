#!/usr/bin/env python3
"""Broker memory per idle, authenticated, subscribed connection, on the embedded node.

Starts `lorabroker dev` on free loopback ports with a known API key, opens N MQTT
connections (CONNECT with the key, one SUBSCRIBE to one device's topics each), waits, and
prints the growth of the broker's RSS divided by N. Needs `ulimit -n` above N.

    cargo build --release && python3 benches/idle_rss.py target/release/lorabroker 10000
    RUST_LOG=info python3 benches/idle_rss.py target/release/lorabroker 10000   # with spans

    python3 benches/idle_rss.py target/release/lorabroker 10000 --tls --mosquitto

--tls measures MQTT over TLS instead (`dev --tls`: its throw-away CA and certificate, TLS
1.3 from Python's ssl module); --mosquitto also starts a private `mosquitto -c conf` on a
free loopback port (TLS with the same certificate under --tls) and measures it the same
way in the same run.

PRE="valgrind --tool=massif" WAIT=20 runs the broker under a heap profiler instead.
(The load generator's `idle` scenario measures the same against any broker.)
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

args = [a for a in sys.argv[1:] if not a.startswith('--')]
flags = {a for a in sys.argv[1:] if a.startswith('--')}
binary, n = args[0], int(args[1])
tls, with_mosquitto = '--tls' in flags, '--mosquitto' in flags
import socket as _s, ssl, tempfile
def free():
    x=_s.socket(); x.bind(('127.0.0.1',0)); p=x.getsockname()[1]; x.close(); return p

def open_idle(port, ctx, user, key):
    """N connections, each CONNECTed and SUBSCRIBEd; returns them and the time taken."""
    socks = []
    t0 = time.time()
    for i in range(n):
        s = socket.create_connection(('127.0.0.1', port))
        if ctx:
            s = ctx.wrap_socket(s, server_hostname='localhost')
        s.sendall(connect_pkt(f'idle-{i}'.encode(), user, key.encode()))
        ack = recvn(s, 4)
        assert ack[3] == 0, ack
        s.sendall(sub_pkt(1, f'v3/demo/devices/dev{i}/#'.encode()))
        sa = recvn(s, 5)
        assert sa[4] == 0, sa
        socks.append(s)
    return socks, time.time() - t0

def measure(name, pid, port, ctx, user, key):
    base = rss(pid)
    socks, took = open_idle(port, ctx, user, key)
    time.sleep(2)
    after = rss(pid)
    mode = 'TLS' if ctx else 'TCP'
    print(f'{name} ({mode}): {n} conns in {took:.1f}s; RSS {base} KiB -> {after} KiB; {(after-base)*1024/n:.0f} bytes/conn', flush=True)
    for s in socks:
        s.close()

port = free(); hport = free(); tport = free()
key = 'NNSXS.' + base64.b32encode(os.urandom(24)).decode().rstrip('=') + '.' + base64.b32encode(os.urandom(32)).decode().rstrip('=')
env = dict(os.environ, RUST_LOG=os.environ.get('RUST_LOG', 'warn'))
# All N connections come from one address with one key: rate limits and connection quotas
# off, as benches/compare.sh does (Mosquitto runs without any).
for limit in ['ACCEPTS_PER_IP__PER_SECOND', 'CONNECTS_PER_KEY__PER_SECOND',
              'SUBSCRIBES_PER_CONNECTION__PER_SECOND', 'MAX_CONNECTIONS_PER_APPLICATION',
              'MAX_CONNECTIONS_PER_KEY', 'MAX_CONNECTIONS_PER_TENANT']:
    env.setdefault('LORABROKER_LIMITS__' + limit, '0')
pre = os.environ.get('PRE','').split()
cmd = pre + [binary, 'dev', '--mqtt-listen', f'127.0.0.1:{port}', '--http-listen', f'127.0.0.1:{hport}',
             '--devices', '1', '--uplink-interval', '1h', '--api-key', key]
if tls:
    cmd += ['--tls', '--mqtt-tls-listen', f'127.0.0.1:{tport}']
p = subprocess.Popen(cmd, stdout=subprocess.PIPE if tls else subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env=env, text=True)
ctx, ca = None, None
if tls:
    # The banner names the throw-away CA: "  CA        /tmp/lorabroker-dev-tls-…/ca.pem".
    for line in p.stdout:
        if line.strip().startswith('CA '):
            ca = line.split(None, 1)[1].strip()
            break
    ctx = ssl.create_default_context(cafile=ca)
mosq = None
try:
    time.sleep(float(os.environ.get('WAIT','1.5')))
    measure(binary, p.pid, tport if tls else port, ctx, b'demo', key)
    if with_mosquitto:
        conf_dir = tempfile.mkdtemp(prefix='idle-rss-mosquitto-')
        mport = free()
        conf = [f'listener {mport} 127.0.0.1', 'allow_anonymous true', 'persistence false',
                'log_dest none', 'max_connections -1']
        if tls:
            d = os.path.dirname(ca)
            conf += [f'cafile {ca}', f'certfile {d}/server.pem', f'keyfile {d}/server-key.pem']
        path = os.path.join(conf_dir, 'mosquitto.conf')
        open(path, 'w').write('\n'.join(conf) + '\n')
        mosq = subprocess.Popen(['mosquitto', '-c', path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        version = subprocess.run(['mosquitto', '-h'], capture_output=True, text=True).stdout.splitlines()[0]
        measure(version, mosq.pid, mport, ctx, b'demo', key)
finally:
    if mosq:
        mosq.kill(); mosq.wait()
    p.send_signal(signal.SIGINT if pre else signal.SIGKILL); time.sleep(float(os.environ.get('WAIT','0')))
    p.wait()
