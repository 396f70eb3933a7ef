//! The `--metrics-addr` endpoint: Prometheus scrapes `GET /metrics` over HTTP on loopback.
//!
//! A plain `std::net::TcpListener` with a thread per connection, not an HTTP crate: the
//! endpoint answers one kind of request, with no keep-alive, TLS, routing or request body,
//! which takes some hundred lines here and no dependency. `tiny_http` was weighed: it would
//! add four crates, and its own worker threads would still need the per-request deadline and
//! the connection limit below to keep one slow client from holding a worker.
//!
//! One slow client must neither delay the other scrapes nor the command's exit, so:
//! - the accept loop only accepts: each connection is answered on a thread of its own, and at
//!   most [`MAX_CONNECTIONS`] are answered at once (a client beyond that gets `503` at once and
//!   the connection closed, without the accept loop ever waiting on it);
//! - a connection has [`CLIENT_TIMEOUT`] in all to send its request head and read the answer
//!   (a deadline over the whole exchange, not per read, so a byte every second cannot hold it);
//! - stopping the server stops the accept loop only; connection threads are not waited for,
//!   they end by their deadline at the latest.
//!
//! The endpoint has no authentication, so it binds only loopback addresses; to scrape from
//! elsewhere, put a proxy in front of it.
//!
//! The exposition comes from a `prometheus_client` registry (see `gpupool::telemetry`); the
//! [`CurrentManager`] collector serves whichever manager the command is running now.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpupool::telemetry;
use gpupool::telemetry::prometheus_client::collector::Collector;
use gpupool::telemetry::prometheus_client::encoding::DescriptorEncoder;
use gpupool::telemetry::prometheus_client::registry::Registry;
use gpupool::MemoryManager;

/// How long a client may take, in all, to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most connections answered at once; Prometheus sends one scrape at a time, so this is
/// room for a few people with curl, not a throughput figure.
const MAX_CONNECTIONS: usize = 8;
/// The longest request head read.
const MAX_REQUEST_BYTES: usize = 8192;
/// The pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

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

/// How patient the server is with its clients (the tests shorten or lengthen them).
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// The deadline of one exchange, from accept to the last byte of the answer.
    client_timeout: Duration,
    /// Connections answered at once.
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            client_timeout: CLIENT_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// One connection being answered: counted in `in_flight` until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a connection in, unless `limit` are in flight already.
    fn enter(in_flight: &Arc<AtomicUsize>, limit: usize) -> Option<InFlight> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                (count < limit).then_some(count + 1)
            })
            .ok()
            .map(|_| InFlight(in_flight.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl MetricsServer {
    /// Binds `address` (a loopback address; port 0 picks a free port) and serves `registry`.
    pub fn start(address: SocketAddr, registry: Registry) -> io::Result<MetricsServer> {
        MetricsServer::start_with(address, registry, Limits::default())
    }

    fn start_with(
        address: SocketAddr,
        registry: Registry,
        limits: Limits,
    ) -> io::Result<MetricsServer> {
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
                move || accept_loop(&listener, Arc::new(registry), &stop, limits)
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
        // Wake the blocking accept; it sees the flag and returns. The accept loop never waits
        // on a client, so this join is prompt; connection threads are left to their deadline.
        let _ = TcpStream::connect_timeout(&self.address, CLIENT_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stop`, handing each to a thread of its own.
fn accept_loop(listener: &TcpListener, registry: Arc<Registry>, stop: &AtomicBool, limits: Limits) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    for connection in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match connection {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics accept failed");
                std::thread::sleep(ACCEPT_RETRY_PAUSE);
                continue;
            }
        };
        let Some(slot) = InFlight::enter(&in_flight, limits.max_connections) else {
            refuse_busy(stream);
            continue;
        };
        let registry = registry.clone();
        let spawned = std::thread::Builder::new()
            .name("gpupool-metrics-client".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(error) = answer(stream, &registry, limits.client_timeout) {
                    tracing::debug!(%error, "metrics request failed");
                }
            });
        if let Err(error) = spawned {
            tracing::debug!(%error, "cannot start a metrics connection thread");
        }
    }
}

/// Answers `503` to a client over the connection limit, without waiting on it: the socket is
/// non-blocking, so whatever the kernel does not take at once is dropped with the connection.
fn refuse_busy(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    // Take the part of the request already here: closing a socket with unread data resets the
    // connection, and the client could lose the answer.
    let mut chunk = [0u8; 1024];
    for _ in 0..MAX_REQUEST_BYTES / chunk.len() {
        if !matches!(stream.read(&mut chunk), Ok(read) if read > 0) {
            break;
        }
    }
    let body = "too many metrics connections\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write(response.as_bytes());
}

/// The time left before `deadline`, or a timed-out error once it has passed (a zero timeout
/// would mean "no timeout" to the socket).
fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took too long",
        ));
    }
    Ok(left)
}

/// Reads one request head and writes the answer, all within `timeout` of the call.
fn answer(mut stream: TcpStream, registry: &Registry, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        stream.set_read_timeout(Some(time_left(deadline)?))?;
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
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    write_before(&mut stream, response.as_bytes(), deadline)?;
    stream.flush()
}

/// Writes all of `bytes` before `deadline`: a client reading a byte at a time cannot stretch
/// the answer past it.
fn write_before(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::mpsc;

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

    /// What `request` gets before the connection ends, even if it ends in an error (a refused
    /// connection may be reset after its `503`).
    fn get_lenient(address: SocketAddr, request: &str) -> String {
        let mut response = Vec::new();
        if let Ok(mut stream) = TcpStream::connect(address) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut response);
            }
        }
        String::from_utf8_lossy(&response).into_owned()
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

    /// A server on a free loopback port serving an empty registry, with these limits.
    fn server_with(limits: Limits) -> MetricsServer {
        MetricsServer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            telemetry::registry(CurrentManager::default()),
            limits,
        )
        .unwrap()
    }

    /// A client that sends the first byte of its request and then stalls.
    fn stalled_client(address: SocketAddr) -> TcpStream {
        let mut client = TcpStream::connect(address).unwrap();
        client.write_all(b"G").unwrap();
        client
    }

    /// Whether the server has neither answered `client` nor closed its connection.
    fn still_open(client: &TcpStream) -> bool {
        client.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let open = matches!(client.peek(&mut byte), Err(error) if error.kind() == io::ErrorKind::WouldBlock);
        client.set_nonblocking(false).unwrap();
        open
    }

    #[test]
    fn c3_a_stalled_client_delays_neither_other_scrapes_nor_the_stop() {
        // A deadline far beyond the test, so the stalled client stays connected throughout.
        let server = server_with(Limits {
            client_timeout: Duration::from_secs(600),
            ..Limits::default()
        });
        let stalled = stalled_client(server.local_addr());
        let response = get(server.local_addr(), "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            still_open(&stalled),
            "answered while the stalled client waits"
        );

        // Stop on another thread, so that a stop waiting on the stalled client fails the test
        // rather than hanging it.
        let (stopped, stop_returned) = mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = stopped.send(());
        });
        stop_returned
            .recv_timeout(Duration::from_secs(60))
            .expect("stop returns while a client stalls");
        assert!(
            still_open(&stalled),
            "stop did not wait for the stalled client"
        );
    }

    #[test]
    fn c3_a_client_trickling_its_request_is_cut_off_at_the_deadline() {
        let server = server_with(Limits {
            client_timeout: Duration::from_millis(300),
            ..Limits::default()
        });
        let mut trickler = TcpStream::connect(server.local_addr()).unwrap();
        // A byte every 100 ms would keep a per-read timeout waiting for ever; the deadline is
        // over the whole request. The request never ends within these 100 bytes.
        for _ in 0..100 {
            if trickler.write_all(b"G").is_err() || !still_open(&trickler) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!still_open(&trickler), "the server closed the connection");
    }

    #[test]
    fn c3_connections_beyond_the_limit_get_503_and_free_slots_are_reused() {
        let server = server_with(Limits {
            client_timeout: Duration::from_secs(600),
            max_connections: 2,
        });
        let stalled: Vec<TcpStream> = (0..2)
            .map(|_| stalled_client(server.local_addr()))
            .collect();
        // This client sends nothing, so the refusal cannot race its request.
        let mut third = TcpStream::connect(server.local_addr()).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut refused = String::new();
        third.read_to_string(&mut refused).unwrap();
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        // Once the stalled clients leave, their slots serve scrapes again (their threads see
        // the end of the connection and finish).
        drop(stalled);
        let mut answered = false;
        for _ in 0..400 {
            let response = get_lenient(server.local_addr(), "GET /metrics HTTP/1.1\r\n\r\n");
            if response.starts_with("HTTP/1.1 200 OK") {
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            answered,
            "a scrape is answered once the stalled clients are gone"
        );
    }
}
