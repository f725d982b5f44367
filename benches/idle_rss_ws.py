#!/usr/bin/env python3
"""Broker memory per idle, authenticated, subscribed connection, on the embedded node.

Starts `lorabroker dev` on free loopback ports with a known API key, opens N MQTT
connections (CONNECT with the key, one SUBSCRIBE to one device's topics each), waits, and
prints the growth of the broker's RSS divided by N. Needs `ulimit -n` above N.

    cargo build --release && python3 benches/idle_rss.py target/release/lorabroker 10000
    RUST_LOG=info python3 benches/idle_rss.py target/release/lorabroker 10000   # with spans
    TRANSPORT=ws python3 benches/idle_rss.py target/release/lorabroker 10000    # over ws://…/mqtt
    TRANSPORT=ws python3 benches/idle_rss.py /usr/sbin/mosquitto 10000          # Mosquitto, same way

TRANSPORT=ws connects over WebSocket (subprotocol mqtt, each packet in one masked binary
frame). A binary named `mosquitto` is run with a private config (`listener PORT`, plus
`protocol websockets` for ws, anonymous) on a free port instead of `lorabroker dev`.

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

WS = os.environ.get('TRANSPORT', 'tcp') == 'ws'

def ws_upgrade(s, port):
    key = base64.b64encode(os.urandom(16))
    s.sendall(b'GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n'
              b'Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n'
              b'Sec-WebSocket-Protocol: mqtt\r\n\r\n' % (port, key))
    head = b''
    while b'\r\n\r\n' not in head:
        c = s.recv(1)
        if not c: raise Exception('closed during the upgrade')
        head += c
    assert head.startswith(b'HTTP/1.1 101'), head

def ws_frame(payload):
    mask = os.urandom(4)
    n = len(payload)
    head = b'\x82' + (bytes([0x80 | n]) if n < 126 else b'\xfe' + struct.pack('>H', n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

def send(s, packet):
    s.sendall(ws_frame(packet) if WS else packet)

def recv_packet(s, n):
    if not WS:
        return recvn(s, n)
    b0, b1 = recvn(s, 2)
    assert b0 == 0x82 and b1 < 126, (b0, b1)
    data = recvn(s, b1)
    assert len(data) == n, data
    return data

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
if os.path.basename(binary) == 'mosquitto':
    import tempfile
    conf = tempfile.NamedTemporaryFile('w', suffix='.conf', delete=False)
    conf.write(f'listener {port} 127.0.0.1\nallow_anonymous true\n' + ('protocol websockets\n' if WS else ''))
    conf.close()
    cmd = [binary, '-c', conf.name]
else:
    cmd = [binary, 'dev', '--mqtt-listen', f'127.0.0.1:{free() if WS else port}', '--http-listen', f'127.0.0.1:{hport}',
           '--devices', '1', '--uplink-interval', '1h', '--api-key', key]
    cmd += ['--mqtt-ws-listen', f'127.0.0.1:{port}'] if WS else ['--mqtt-ws-listen', '']
p = subprocess.Popen(pre + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
try:
    time.sleep(float(os.environ.get('WAIT','1.5')))
    base = rss(p.pid)
    socks = []
    t0 = time.time()
    for i in range(n):
        s = socket.create_connection(('127.0.0.1', port))
        if WS:
            ws_upgrade(s, port)
        send(s, connect_pkt(f'idle-{i}'.encode(), b'demo', key.encode()))
        ack = recv_packet(s, 4)
        assert ack[3] == 0, ack
        send(s, sub_pkt(1, f'v3/demo/devices/dev{i}/#'.encode()))
        sa = recv_packet(s, 5)
        assert sa[4] == 0, sa
        socks.append(s)
    t1 = time.time()
    time.sleep(2)
    after = rss(p.pid)
    print(f'{binary} ({"ws" if WS else "tcp"}): {n} conns in {t1-t0:.1f}s; RSS {base} KiB -> {after} KiB; {(after-base)*1024/n:.0f} bytes/conn')
finally:
    p.send_signal(signal.SIGINT if pre else signal.SIGKILL); time.sleep(float(os.environ.get('WAIT','0')))
    p.wait()
