#!/usr/bin/env python3
"""Broker memory per half-open (unauthenticated) socket, on the embedded node.

Starts `lorabroker dev` on free loopback ports with a 60 s connect timeout, opens N sockets
of one KIND, waits, and prints the growth of the broker's RSS divided by N, the sockets
the broker closed, and its lorabroker_pending_handshakes gauge. Needs `ulimit -n` above N.

    python3 benches/half_open_rss.py target/release/lorabroker 10000 silent
    python3 benches/half_open_rss.py target/release/lorabroker 10000 partial64k
    python3 benches/half_open_rss.py target/release/lorabroker 10000 partial4k

KIND: `silent` sends nothing; `partial64k` announces a 64 KiB CONNECT and sends 1 KiB of it
(closed at its fixed header since mqtt.max_connect_size); `partial4k` announces a CONNECT
just under mqtt.max_connect_size (4 KiB) and sends 1 KiB of it, the most an unauthenticated
socket can make the broker hold. PENDING (default N + 100) sets mqtt.max_pending_handshakes,
so that every socket is held and measured; PENDING=1024 shows the default bound instead.
"""
import os, signal, socket, subprocess, sys, time, urllib.request

def rl(n):
    out = b''
    while True:
        b = n % 128; n //= 128
        if n: b |= 0x80
        out += bytes([b])
        if not n: return out

def rss(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])

def free():
    x = socket.socket(); x.bind(('127.0.0.1', 0)); p = x.getsockname()[1]; x.close(); return p

binary, n, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
head = b'\x00\x04MQTT\x04\xc2\x00\x1e'
payload = {
    'silent': b'',
    'partial64k': b'\x10' + rl(65536) + head + b'x' * (1024 - 4 - len(head)),
    'partial4k': b'\x10' + rl(4000) + head + b'x' * (1024 - 3 - len(head)),
}[kind]
port, hport = free(), free()
env = dict(os.environ, RUST_LOG=os.environ.get('RUST_LOG', 'warn'),
           LORABROKER_MQTT__CONNECT_TIMEOUT='60s',
           LORABROKER_MQTT__MAX_PENDING_HANDSHAKES=os.environ.get('PENDING', str(n + 100)))
p = subprocess.Popen([binary, 'dev', '--mqtt-ws-listen', '', '--mqtt-listen', f'127.0.0.1:{port}', '--http-listen',
                      f'127.0.0.1:{hport}', '--devices', '1', '--uplink-interval', '1h'],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
try:
    time.sleep(1.5)
    base = rss(p.pid)
    socks = []
    for i in range(n):
        s = socket.create_connection(('127.0.0.1', port))
        if payload:
            s.sendall(payload)
        socks.append(s)
    time.sleep(3)
    after = rss(p.pid)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b''
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    metrics = urllib.request.urlopen(f'http://127.0.0.1:{hport}/metrics').read().decode()
    pending = next(l.split()[1] for l in metrics.splitlines()
                   if l.startswith('lorabroker_pending_handshakes '))
    print(f'{binary} {kind}: {n} sockets, {closed} closed by the broker, {pending} pending; '
          f'RSS {base} KiB -> {after} KiB; {(after - base) * 1024 / n:.0f} bytes/socket')
finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
