//! The `--metrics-addr` endpoint: Prometheus scrapes `GET /metrics` over HTTP on loopback.
//!
//! A plain `std::net::TcpListener` loop, not an HTTP crate: the endpoint answers one kind of
//! request (a scrape every few seconds, one at a time), with no keep-alive, TLS, routing or
//! request body, which takes some sixty lines here and no dependency (`tiny_http` would add
//! four crates for the same). Each connection gets a read and write timeout, so a stalled
//! client cannot hold the loop. The endpoint has no authentication, so it binds only loopback
//! addresses; to scrape from elsewhere, put a proxy in front of it.
//!
//! The exposition comes from a `prometheus_client` registry (see `gpupool::telemetry`); the
//! [`CurrentManager`] collector serves whichever manager the command is running now.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use gpupool::telemetry;
use gpupool::MemoryManager;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
const MAX_REQUEST_BYTES: usize = 8192;

/// A collector of the manager a command is running now; before the first, it serves nothing.
#[derive(Clone, Debug, Default)]
pub struct CurrentManager {
    manager: Arc<Mutex<Option<MemoryManager>>>,
}

impl CurrentManager {
    /// Serves `manager` from now on.
    pub fn set(&self, manager: &MemoryManager) {
        *self.manager.lock().unwrap_or_else(PoisonError::into_inner) = Some(manager.clone());
    }
}

impl Collector for CurrentManager {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        // Clone the handle out, so a scrape never holds the lock while it snapshots the pool.
        let manager = self
            .manager
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match manager {
            Some(manager) => telemetry::encode_stats(&manager.stats(), encoder),
            None => Ok(()),
        }
    }
}

/// A running endpoint; dropping it stops the server.
pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `address` (a loopback address; port 0 picks a free port) and serves `registry`.
    pub fn start(address: SocketAddr, registry: Registry) -> io::Result<MetricsServer> {
        if !address.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--metrics-addr {address}: the endpoint has no authentication, so it only \
                     binds loopback addresses (127.0.0.1, [::1])"
                ),
            ));
        }
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("gpupool-metrics".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    for connection in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        if let Ok(stream) = connection {
                            if let Err(error) = answer(stream, &registry) {
                                tracing::debug!(%error, "metrics request failed");
                            }
                        }
                    }
                }
            })?;
        Ok(MetricsServer {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// The address bound (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.address, CLIENT_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request head and writes the answer.
fn answer(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (request_line.next(), request_line.next());
    let path = target.map(|target| target.split('?').next().unwrap_or(target));
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            telemetry::CONTENT_TYPE,
            telemetry::encode(registry),
        ),
        (Some("GET"), Some("/")) => (
            "200 OK",
            "text/plain; charset=utf-8",
            "gpupool metrics: GET /metrics\n".to_string(),
        ),
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".into(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use gpupool::backend::sim::SimBackend;

    use super::*;

    fn get(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    /// Checks the OpenMetrics structure; returns the value of every series.
    fn parse_exposition(body: &str) -> HashMap<String, f64> {
        assert!(body.ends_with("# EOF\n"), "no EOF marker");
        let mut types: HashMap<String, String> = HashMap::new();
        let mut series = HashMap::new();
        for line in body.lines().filter(|line| *line != "# EOF") {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declaration.split_once(' ').expect("TYPE name kind");
                assert!(name.starts_with("gpupool_"), "{line}");
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "twice: {line}"
                );
            } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            } else {
                assert!(!line.starts_with('#'), "unknown comment: {line}");
                let (key, value) = line.rsplit_once(' ').expect("series value");
                let value: f64 = value.parse().expect("numeric value");
                let name = key.split('{').next().unwrap();
                let family = [
                    name,
                    name.trim_end_matches("_total"),
                    name.trim_end_matches("_info"),
                ]
                .into_iter()
                .find(|family| types.contains_key(*family))
                .unwrap_or_else(|| panic!("series before its TYPE: {line}"));
                if types[family] == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
                if key.contains('{') {
                    assert!(key.ends_with('}'), "{line}");
                }
                assert!(
                    series.insert(key.to_string(), value).is_none(),
                    "twice: {line}"
                );
            }
        }
        series
    }

    fn total(series: &HashMap<String, f64>, name: &str) -> u64 {
        series
            .iter()
            .filter(|(key, _)| key.split('{').next() == Some(name))
            .map(|(_, value)| *value as u64)
            .sum()
    }

    #[test]
    fn a_scrape_over_tcp_matches_the_pools_statistics() {
        let manager = MemoryManager::new(SimBackend::default());
        let current = CurrentManager::default();
        current.set(&manager);
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), telemetry::registry(current))
                .unwrap();
        assert_ne!(server.local_addr().port(), 0);

        // A small workload: reuse of two sizes, a few buffers held.
        let _held: Vec<_> = (0..5)
            .map(|_| manager.allocate_bytes(3000).unwrap())
            .collect();
        for round in 0..200 {
            drop(manager.allocate_bytes(256 << (round % 4)).unwrap());
        }

        let response = get(
            server.local_addr(),
            "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n",
        );
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {}", telemetry::CONTENT_TYPE)));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let series = parse_exposition(body);
        let stats = manager.stats();
        assert_eq!(total(&series, "gpupool_hits_total"), stats.totals.hits);
        assert_eq!(total(&series, "gpupool_misses_total"), stats.totals.misses);
        assert_eq!(
            total(&series, "gpupool_requests_total"),
            stats.totals.requests
        );
        assert_eq!(stats.totals.requests, 205);
        assert_eq!(
            series[r#"gpupool_in_use_blocks{device="0",class="4096",kind="device"}"#],
            5.0
        );

        let missing = get(server.local_addr(), "GET /nothing HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(server.local_addr(), "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        drop(server);
    }

    #[test]
    fn only_loopback_addresses_are_bound() {
        let error = MetricsServer::start("0.0.0.0:0".parse().unwrap(), Registry::default())
            .err()
            .expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("loopback"));
    }

    #[test]
    fn before_any_manager_the_endpoint_serves_an_empty_exposition() {
        let server = MetricsServer::start(
            "127.0.0.1:0".parse().unwrap(),
            telemetry::registry(CurrentManager::default()),
        )
        .unwrap();
        let response = get(server.local_addr(), "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(response.ends_with("\r\n\r\n# EOF\n"), "{response}");
    }
}
