#!/usr/bin/env python3
"""Broker memory per idle, authenticated, subscribed connection, on the embedded node.

Starts `lorabroker dev` on free loopback ports with a known API key, opens N MQTT
connections (CONNECT with the key, one SUBSCRIBE to one device's topics each), waits, and
prints the growth of the broker's RSS divided by N. Needs `ulimit -n` above N.

    cargo build --release && python3 benches/idle_rss.py target/release/lorabroker 10000
    RUST_LOG=info python3 benches/idle_rss.py target/release/lorabroker 10000   # with spans

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

binary, n = sys.argv[1], int(sys.argv[2])
import socket as _s
def free():
    x=_s.socket(); x.bind(('127.0.0.1',0)); p=x.getsockname()[1]; x.close(); return p
port = free(); hport = free()
key = 'NNSXS.' + base64.b32encode(os.urandom(24)).decode().rstrip('=') + '.' + base64.b32encode(os.urandom(32)).decode().rstrip('=')
env = dict(os.environ, RUST_LOG=os.environ.get('RUST_LOG', 'warn'))
pre = os.environ.get('PRE','').split()
p = subprocess.Popen(pre + [binary, 'dev', '--mqtt-listen', f'127.0.0.1:{port}', '--http-listen', f'127.0.0.1:{hport}',
                      '--devices', '1', '--uplink-interval', '1h', '--api-key', key],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
try:
    time.sleep(float(os.environ.get('WAIT','1.5')))
    base = rss(p.pid)
    socks = []
    t0 = time.time()
    for i in range(n):
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(connect_pkt(f'idle-{i}'.encode(), b'demo', key.encode()))
        ack = recvn(s, 4)
        assert ack[3] == 0, ack
        s.sendall(sub_pkt(1, f'v3/demo/devices/dev{i}/#'.encode()))
        sa = recvn(s, 5)
        assert sa[4] == 0, sa
        socks.append(s)
    t1 = time.time()
    time.sleep(2)
    after = rss(p.pid)
    print(f'{binary}: {n} conns in {t1-t0:.1f}s; RSS {base} KiB -> {after} KiB; {(after-base)*1024/n:.0f} bytes/conn')
finally:
    p.send_signal(signal.SIGINT if pre else signal.SIGKILL); time.sleep(float(os.environ.get('WAIT','0')))
    p.wait()
