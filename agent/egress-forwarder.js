#!/usr/bin/env node
// nightcrier-egress: the agent container's side of nightcrier's network gate (README.md,
// "Agent network gate").
//
// The container has no network. nightcrier names, in NIGHTCRIER_EGRESS (JSON), a Unix socket
// mounted into the container, the loopback addresses to listen on (each allowed destination's
// name is mapped to its own 127.77.x.y in /etc/hosts), and a CONNECT proxy address for wildcard
// entries. Each accepted connection is tunnelled through the socket: the forwarder writes
// "host:port\n", nightcrier answers "OK\n" or "NO <reason>\n" and then splices bytes. The gate
// decides what is allowed; this program only carries bytes, so a changed or missing copy of it
// can never widen what the agent reaches.
//
// Run without arguments it starts the forwarder in the background and exits 0 once every
// listener is bound (1, with the reason on stderr, when one cannot be).
'use strict';
const net = require('net');
const { spawn } = require('child_process');

const HEAD_LIMIT = 8192;

function plan() {
  return JSON.parse(process.env.NIGHTCRIER_EGRESS || '{}');
}

// Opens a tunnel to `dest` through the gate; calls back once with (error, socket, bytesAfterAnswer).
// Errors after the answer belong to the spliced connection, not to this callback.
function tunnel(socketPath, dest, callback) {
  let called = false;
  const done = (...args) => { if (!called) { called = true; callback(...args); } };
  const gate = net.connect(socketPath);
  let answer = Buffer.alloc(0);
  const onData = (chunk) => {
    answer = Buffer.concat([answer, chunk]);
    const end = answer.indexOf(10);
    if (end < 0) {
      if (answer.length > 512) { gate.destroy(); done(new Error('bad answer from the gate')); }
      return;
    }
    gate.removeListener('data', onData);
    gate.pause();
    const line = answer.subarray(0, end).toString();
    if (line === 'OK') done(null, gate, answer.subarray(end + 1));
    else { gate.destroy(); done(new Error(line.replace(/^NO /, '') || 'refused')); }
  };
  gate.on('data', onData);
  gate.on('error', (err) => done(err));
  gate.write(dest + '\n');
}

function splice(client, gate, rest) {
  if (rest.length) client.write(rest);
  client.pipe(gate);
  gate.pipe(client);
  gate.resume();
  const close = () => { client.destroy(); gate.destroy(); };
  client.on('error', close);
  gate.on('error', close);
  client.on('close', close);
  gate.on('close', close);
}

function forward(socketPath, dest) {
  return net.createServer((client) => {
    client.pause();
    tunnel(socketPath, dest, (err, gate, rest) => {
      if (err) { client.destroy(); return; }
      splice(client, gate, rest);
      client.resume();
    });
    client.on('error', () => client.destroy());
  });
}

function proxy(socketPath) {
  return net.createServer((client) => {
    let head = Buffer.alloc(0);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (head.length > HEAD_LIMIT) client.end('HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n');
        return;
      }
      client.removeListener('data', onData);
      client.pause();
      const match = /^CONNECT (\S+) HTTP\/1\.[01]\r\n/.exec(head.subarray(0, end + 2).toString('latin1'));
      if (!match) { client.end('HTTP/1.1 405 Method Not Allowed\r\n\r\n'); return; }
      tunnel(socketPath, match[1], (err, gate, rest) => {
        if (err) { client.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n'); return; }
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
        const early = head.subarray(end + 4);
        if (early.length) gate.write(early);
        splice(client, gate, rest);
        client.resume();
      });
    };
    client.on('data', onData);
    client.on('error', () => client.destroy());
  });
}

function serve() {
  const p = plan();
  const servers = (p.listen || []).map((l) => [forward(p.socket, l.dest), l.addr, l.port]);
  if (p.proxy) servers.push([proxy(p.socket), p.proxy.addr, p.proxy.port]);
  let pending = servers.length;
  const ready = () => { if (process.send) { process.send('ready'); process.disconnect(); } };
  if (!pending) ready();
  for (const [server, addr, port] of servers) {
    server.on('error', (err) => {
      if (process.send) process.send(`cannot listen on ${addr}:${port}: ${err.message}`);
      process.exit(1);
    });
    server.listen(port, addr, () => { if (--pending === 0) ready(); });
  }
}

function start() {
  const child = spawn(process.execPath, [__filename, '--serve'],
    { detached: true, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  child.on('message', (msg) => {
    if (msg === 'ready') { child.unref(); process.exit(0); }
    process.stderr.write(`nightcrier-egress: ${msg}\n`);
    process.exit(1);
  });
  child.on('exit', (code) => {
    process.stderr.write(`nightcrier-egress: forwarder ended (${code})\n`);
    process.exit(1);
  });
}

if (process.argv[2] === '--serve') serve(); else start();
