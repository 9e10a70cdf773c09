//! Proxies: the identity service, the data store API and S3 are all
//! reached through `HTTPS_PROXY`/`HTTP_PROXY` (or lower-case, or
//! `ALL_PROXY`) unless `NO_PROXY` names their host, as on HPC compute
//! nodes. A forwarding proxy of a few lines of Python counts what went
//! through it, by kind of request; the emulator is plain HTTP on
//! 127.0.0.1, which goes through the proxy when `NO_PROXY` is empty.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;

/// A forwarding proxy: absolute-URI GET/HEAD/POST/PUT/DELETE and CONNECT.
/// It counts requests by kind (`identity`, `datastore`, `s3` for SigV4
/// signed ones, `unsigned` for others, `connect`) and by target host, in a
/// JSON file rewritten after each request. It logs nothing (no header,
/// where credentials live, is ever written down).
const PROXY: &str = r#"
import http.client, json, os, select, socket, sys, threading, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNTS, LOCK, OUT = {}, threading.Lock(), sys.argv[1]
HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
       "proxy-authenticate", "te", "trailers", "transfer-encoding", "upgrade"}

def count(*keys):
    with LOCK:
        for k in keys:
            COUNTS[k] = COUNTS.get(k, 0) + 1
        tmp = OUT + ".tmp"
        with open(tmp, "w") as f:
            json.dump(COUNTS, f)
        os.replace(tmp, OUT)

class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        u = urllib.parse.urlsplit(self.path)
        if u.scheme != "http" or not u.hostname:
            self.send_error(400, "absolute http URI required")
            return
        path = u.path or "/"
        if path.startswith("/auth/realms/"):
            kind = "identity"
        elif path.startswith("/registry/"):
            kind = "datastore"
        elif self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"):
            kind = "s3"
        else:
            kind = "unsigned"
        count(kind, "host " + u.netloc)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        up = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        target = path + ("?" + u.query if u.query else "")
        up.request(self.command, target, body=body, headers=headers)
        r = up.getresponse()
        data = r.read()
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = r.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        up.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = forward

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        count("connect", "host " + self.path)
        try:
            up = socket.create_connection((host, int(port)), timeout=60)
        except OSError:
            self.send_error(502)
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        socks = [self.connection, up]
        while True:
            ready, _, _ = select.select(socks, [], [], 60)
            if not ready:
                break
            for s in ready:
                b = s.recv(65536)
                if not b:
                    up.close()
                    self.close_connection = True
                    return
                (up if s is self.connection else self.connection).sendall(b)

srv = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

struct Proxy {
    child: Child,
    counts: PathBuf,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let counts = dir.path().join("counts.json");
        let mut child = Command::new("python3")
            .arg("-u")
            .arg("-c")
            .arg(PROXY)
            .arg(&counts)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the proxy's port");
        Proxy {
            child,
            counts,
            _dir: dir,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far, by kind and by `host HOST:PORT`.
    fn counts(&self) -> HashMap<String, u64> {
        std::fs::read_to_string(&self.counts)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn total(&self) -> u64 {
        self.counts()
            .iter()
            .filter(|(k, _)| !k.starts_with("host "))
            .map(|(_, v)| v)
            .sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An emulator with one dataset holding one file; the file's content.
fn sim() -> (Sim, Vec<u8>) {
    let d = tempfile::tempdir().unwrap();
    let data = bytes(41, 3 << 20);
    write(d.path(), "10378.1/7/data/f.bin", &data);
    (Sim::start(d, &[]), data)
}

/// Mounts with `env`, reads the file, and checks it byte for byte.
fn mount_and_read(sim: &Sim, data: &[u8], env: &[(&str, &str)]) -> Mount {
    let m = mount_with_env(sim, &[], env);
    let got = std::fs::read(m.join("10378.1/7/data/f.bin")).unwrap();
    assert!(got == data, "the file read through the mount differs");
    m
}

/// Every kind of request went through `p`, and to the emulator.
fn assert_all_proxied(p: &Proxy, sim: &Sim, what: &str) {
    let c = p.counts();
    for kind in ["identity", "datastore", "s3"] {
        assert!(
            c.get(kind).copied().unwrap_or(0) > 0,
            "{what}: no {kind} request went through the proxy: {c:?}"
        );
    }
    assert!(
        c.get(&format!("host {}", sim.addr)).copied().unwrap_or(0) > 0,
        "{what}: {c:?}"
    );
}

#[test]
fn every_client_goes_through_https_proxy_and_http_proxy() {
    if !fuse_available() {
        return;
    }
    let (sim, data) = sim();
    let p = Proxy::start();
    // Credentials in the proxy URL: used, never logged.
    let url = format!("http://provenafs:proxy-pass-123@127.0.0.1:{}", p.port);
    let m = mount_and_read(
        &sim,
        &data,
        &[
            ("HTTPS_PROXY", &url),
            ("HTTP_PROXY", &url),
            ("NO_PROXY", ""),
        ],
    );
    assert_all_proxied(&p, &sim, "HTTP_PROXY");
    let log = log_text(&m);
    assert!(
        log.contains("S3 requests go through a proxy"),
        "the log does not say which proxy S3 requests use"
    );
    assert!(
        log.contains(&format!("127.0.0.1:{}", p.port)),
        "the log does not name the proxy"
    );
    assert!(
        !log.contains("proxy-pass-123"),
        "the proxy's password is in the log"
    );
}

#[test]
fn lower_case_and_all_proxy_work_too() {
    if !fuse_available() {
        return;
    }
    let (sim, data) = sim();
    let p = Proxy::start();
    let url = p.url();
    let _m = mount_and_read(
        &sim,
        &data,
        &[
            ("https_proxy", &url),
            ("http_proxy", &url),
            ("no_proxy", ""),
        ],
    );
    assert_all_proxied(&p, &sim, "http_proxy");

    let q = Proxy::start();
    let url = q.url();
    let _n = mount_and_read(&sim, &data, &[("ALL_PROXY", &url)]);
    assert_all_proxied(&q, &sim, "ALL_PROXY");
}

#[test]
fn no_proxy_naming_the_host_bypasses_the_proxy() {
    if !fuse_available() {
        return;
    }
    let (sim, data) = sim();
    let p = Proxy::start();
    let url = p.url();
    let m = mount_and_read(
        &sim,
        &data,
        &[
            ("HTTPS_PROXY", &url),
            ("HTTP_PROXY", &url),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    );
    assert_eq!(p.total(), 0, "{:?}", p.counts());
    assert!(log_text(&m).contains("S3 requests go direct"));
    // Lower-case too.
    let _n = mount_and_read(
        &sim,
        &data,
        &[("http_proxy", &url), ("no_proxy", "127.0.0.1")],
    );
    assert_eq!(p.total(), 0, "{:?}", p.counts());
}
