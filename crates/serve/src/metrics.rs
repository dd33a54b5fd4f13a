//! Prometheus metrics (`qblk serve --metrics ADDR`): the text exposition
//! format over HTTP, `GET /metrics`, on a unix socket or a loopback TCP
//! address.
//!
//! Nothing here is on the request path. A scrape reads what the workers
//! count anyway — the per-queue relaxed atomics of `stats.rs`, latency
//! histograms included, and the engine's counters — and encodes them with
//! `prometheus-client`'s encoder through a [`Collector`] of our own (the
//! crate's own `Histogram` takes a lock per observation; ours are atomic
//! buckets each worker bumps for its own queue). The only lock a scrape
//! takes that a worker also takes is the engine's tables lock, for the L2
//! cache hit and miss counts: an in-memory critical section of two loads.
//! The allocated size is one `stat(2)` of the image file on the scrape's
//! own thread.
//!
//! HTTP is hyper's (HTTP/1.1, no keep-alive) on one thread with a
//! current-thread tokio runtime of its own, one task per connection.
//! Everything a client can make it spend is bounded: connections at once
//! (`MAX_CONNECTIONS`), the request head's size and the time to send it,
//! a connection's whole life. A client that sends garbage gets a 4xx from
//! hyper and never reaches the disk; a client that stalls is dropped.
//! [`Metrics::stop`] ends the thread (at daemon stop).

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::device::Device;
use crate::stats::{Kind, LATENCY_BUCKETS_NS, TIMED_KINDS};

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    /// A loopback address; port 0 picks a free port (logged).
    Tcp(SocketAddr),
}

/// A `--metrics` argument that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error(
        "--metrics {0}: not a loopback address; the metrics endpoint has no authentication, so it listens only on 127.0.0.0/8, [::1] or a unix socket (expose it further through a proxy that authenticates)"
    )]
    NotLoopback(SocketAddr),
    #[error(
        "--metrics {0}: not an IP address and port; use 127.0.0.1:PORT, [::1]:PORT, or a socket path (unix:PATH)"
    )]
    BadHost(String),
    #[error("--metrics: empty socket path")]
    Empty,
}

impl MetricsAddr {
    /// `unix:PATH`, an IP address and port (loopback only), or a path.
    pub fn parse(s: &str) -> Result<Self, AddrError> {
        if let Some(path) = s.strip_prefix("unix:") {
            return match path {
                "" => Err(AddrError::Empty),
                p => Ok(MetricsAddr::Unix(PathBuf::from(p))),
            };
        }
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return if addr.ip().is_loopback() {
                Ok(MetricsAddr::Tcp(addr))
            } else {
                Err(AddrError::NotLoopback(addr))
            };
        }
        // HOST:PORT with a host name (or a mistyped address) is refused
        // rather than taken for a file name.
        let host_port = s
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.contains('/') && p.parse::<u16>().is_ok());
        if host_port {
            return Err(AddrError::BadHost(s.to_owned()));
        }
        Ok(MetricsAddr::Unix(PathBuf::from(s)))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 32;
/// The most a request's head may take (hyper's minimum is 8 KiB).
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may last, request and response together.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The running metrics endpoint.
pub struct Metrics {
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The address it listens on (the port chosen for port 0).
    pub addr: MetricsAddr,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("addr", &self.addr).finish()
    }
}

/// A bound socket, not yet handed to the runtime.
enum Bound {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Metrics {
    /// Listens on `addr` (a stale unix socket is replaced; the new one is
    /// mode 0600) and answers scrapes from a thread of its own.
    pub fn start(addr: &MetricsAddr, device: Arc<Device>) -> std::io::Result<Metrics> {
        let (bound, addr) = match addr {
            MetricsAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                l.set_nonblocking(true)?;
                (Bound::Unix(l), MetricsAddr::Unix(path.clone()))
            }
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let local = l.local_addr()?;
                l.set_nonblocking(true)?;
                (Bound::Tcp(l), MetricsAddr::Tcp(local))
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let mut registry = Registry::with_prefix("qblk");
        registry.register_collector(Box::new(DeviceCollector { device }));
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qblk-metrics".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, accept(bound, Rc::new(registry), stopped));
                // Dropping the runtime drops the connections still open.
            })?;
        info!(metrics = %addr, "metrics endpoint listening");
        Ok(Metrics {
            stop,
            thread: Some(thread),
            addr,
        })
    }

    /// Stops answering (connections still open are dropped), ends the
    /// thread and removes a unix socket; as dropping it does.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        // A permit is kept if the thread is not waiting yet.
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts connections until told to stop, each served as a task of this
/// thread; at most [`MAX_CONNECTIONS`] at once.
async fn accept(bound: Bound, registry: Rc<Registry>, stop: Arc<tokio::sync::Notify>) {
    enum L {
        Unix(tokio::net::UnixListener),
        Tcp(tokio::net::TcpListener),
    }
    let listener = match bound {
        Bound::Unix(l) => tokio::net::UnixListener::from_std(l).map(L::Unix),
        Bound::Tcp(l) => tokio::net::TcpListener::from_std(l).map(L::Tcp),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            warn!("the metrics endpoint cannot start: {e}");
            return;
        }
    };
    let open = Rc::new(Cell::new(0usize));
    loop {
        let accepted = tokio::select! {
            () = stop.notified() => return,
            a = async {
                match &listener {
                    L::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
                    L::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
                }
            } => a,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait, and go on.
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            // Too many clients at once: hang up on this one.
            continue;
        }
        open.set(open.get() + 1);
        let open = open.clone();
        let registry = registry.clone();
        tokio::task::spawn_local(async move {
            let _ = match stream {
                Stream::Unix(s) => {
                    tokio::time::timeout(CONNECTION_TIMEOUT, serve(s, registry)).await
                }
                Stream::Tcp(s) => {
                    tokio::time::timeout(CONNECTION_TIMEOUT, serve(s, registry)).await
                }
            };
            open.set(open.get() - 1);
        });
    }
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// One connection: one request (no keep-alive), its head bounded in size
/// and time; hyper answers a malformed one with a 4xx by itself.
async fn serve<S>(stream: S, registry: Rc<Registry>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = answer(&req, &registry);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

type Body = http_body_util::Full<bytes::Bytes>;

fn answer<B>(req: &hyper::Request<B>, registry: &Registry) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode, header};
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut r = hyper::Response::new(Body::new(body.into()));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    };
    let plain = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n".into(),
            plain,
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
            plain,
        );
    }
    let mut body = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
        Ok(()) => text(
            StatusCode::OK,
            body,
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        Err(e) => {
            warn!("cannot encode the metrics: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n".into(),
                plain,
            )
        }
    }
}

/// Reads the device's counters at scrape time.
#[derive(Debug)]
struct DeviceCollector {
    device: Arc<Device>,
}

/// Writes one metric family: a descriptor and one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, v) in samples {
        // No labels: the bare name.
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One queue's histogram of one kind, for the encoder.
#[derive(Debug)]
struct Latency(crate::stats::LatencySnapshot);

impl EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.buckets)
            .collect();
        // The count is the buckets' sum, so it always matches `+Inf`
        // (the sum of times may be a request ahead or behind).
        let count = s.buckets.iter().sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            s.sum_ns as f64 / 1e9,
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The allocated bytes of the image file, as QEMU's `actual-size`
/// (st_blocks).
pub(crate) fn allocated_bytes(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

impl Collector for DeviceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let queues = &self.device.queue_stats;
        let q_label = |i: usize| i.to_string();
        let per_kind = |f: fn(crate::stats::KindSnapshot) -> u64| {
            queues.iter().enumerate().flat_map(move |(i, q)| {
                Kind::ALL.into_iter().map(move |k| {
                    (
                        vec![("queue", q_label(i)), ("type", k.name().to_owned())],
                        ConstCounter::new(f(q.kind(k))),
                    )
                })
            })
        };
        family(
            &mut encoder,
            "requests",
            "Requests completed, by queue and type (failed ones included)",
            MetricType::Counter,
            per_kind(|s| s.ops),
        )?;
        family(
            &mut encoder,
            "request_bytes",
            "Bytes of the requests that succeeded, by queue and type",
            MetricType::Counter,
            per_kind(|s| s.bytes),
        )?;
        family(
            &mut encoder,
            "requests_failed",
            "Requests that completed with an I/O error, by queue and type",
            MetricType::Counter,
            per_kind(|s| s.failed),
        )?;
        family(
            &mut encoder,
            "requests_invalid",
            "Requests refused as malformed, by queue",
            MetricType::Counter,
            queues.iter().enumerate().map(|(i, q)| {
                (
                    vec![("queue", q_label(i))],
                    ConstCounter::new(q.invalid_count()),
                )
            }),
        )?;
        family(
            &mut encoder,
            "requests_in_flight",
            "Requests taken from the ring and not completed yet, by queue",
            MetricType::Gauge,
            queues.iter().enumerate().map(|(i, q)| {
                (
                    vec![("queue", q_label(i))],
                    ConstGauge::new(q.in_flight_count() as i64),
                )
            }),
        )?;
        family(
            &mut encoder,
            "request_duration_seconds",
            "Time from taking a request from the ring to writing its status, by queue and type",
            MetricType::Histogram,
            queues.iter().enumerate().flat_map(|(i, q)| {
                TIMED_KINDS.into_iter().filter_map(move |k| {
                    let l = q.latency(k)?;
                    Some((
                        vec![("queue", q_label(i)), ("type", k.name().to_owned())],
                        Latency(l),
                    ))
                })
            }),
        )?;

        let (throttled, waited) = self.device.throttle.counters();
        family(
            &mut encoder,
            "throttled_requests",
            "Requests that waited for the I/O limits (--throttle, block_set_io_throttle)",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(throttled))],
        )?;
        family(
            &mut encoder,
            "throttle_wait_seconds",
            "Time requests waited for the I/O limits, summed",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(waited))],
        )?;
        let gauge = |v: u64| [(Vec::new(), ConstGauge::new(v as i64))];
        family(
            &mut encoder,
            "image_virtual_size_bytes",
            "The disk's size as the guest sees it",
            MetricType::Gauge,
            gauge(self.device.size()),
        )?;
        let disk = self.device.disk();
        family(
            &mut encoder,
            "active",
            "1 while this daemon serves the disk, 0 while another does (blockdev-set-active)",
            MetricType::Gauge,
            gauge(u64::from(disk.is_some())),
        )?;
        let Some(disk) = disk else {
            return Ok(());
        };
        if let Some(bytes) = allocated_bytes(disk.path()) {
            family(
                &mut encoder,
                "image_allocated_size_bytes",
                "Bytes the image file takes on the host (st_blocks, QEMU's actual-size)",
                MetricType::Gauge,
                gauge(bytes),
            )?;
        }

        let Some(s) = disk.stats() else {
            // A raw disk: no engine.
            return Ok(());
        };
        let engine: [(&str, &str, u64); 10] = [
            (
                "engine_allocating_writes",
                "Guest write chunks (up to a cluster each) that allocated",
                s.allocating_writes,
            ),
            (
                "engine_in_place_writes",
                "Guest write chunks that went to a cluster the image owns",
                s.in_place_writes,
            ),
            (
                "engine_metadata_writes",
                "Writes of refcount blocks and tables, L2 and L1 tables and headers",
                s.metadata_writes,
            ),
            (
                "engine_fsyncs",
                "fdatasync calls on the image and its data file",
                s.fsyncs,
            ),
            (
                "engine_cow_bytes",
                "Bytes read and rewritten around guest data by copy-on-write",
                s.cow_bytes,
            ),
            (
                "engine_direct_ios",
                "Reads and writes of guest data straight from and to guest memory",
                s.direct_ios,
            ),
            (
                "engine_bounced_ios",
                "Direct reads and writes that went through a bounce buffer (misaligned)",
                s.bounced_ios,
            ),
            (
                "engine_fixed_ios",
                "Direct transfers through guest memory registered with io_uring",
                s.fixed_ios,
            ),
            (
                "l2_cache_hits",
                "L2 table lookups of guest requests answered from the metadata cache",
                s.l2_hits,
            ),
            (
                "l2_cache_misses",
                "L2 table lookups of guest requests that read the table from the image",
                s.l2_misses,
            ),
        ];
        for (name, help, v) in engine {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                [(Vec::new(), ConstCounter::new(v))],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let tcp = |s: &str| MetricsAddr::Tcp(s.parse().expect("address"));
        assert_eq!(
            MetricsAddr::parse("127.0.0.1:9100").ok(),
            Some(tcp("127.0.0.1:9100"))
        );
        assert_eq!(MetricsAddr::parse("[::1]:0").ok(), Some(tcp("[::1]:0")));
        assert_eq!(
            MetricsAddr::parse("127.1.2.3:1").ok(),
            Some(tcp("127.1.2.3:1"))
        );
        for refused in [
            "0.0.0.0:9100",
            "10.0.0.1:9100",
            "[::]:9100",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(
                matches!(MetricsAddr::parse(refused), Err(AddrError::NotLoopback(_))),
                "{refused}"
            );
        }
        assert!(matches!(
            MetricsAddr::parse("localhost:9100"),
            Err(AddrError::BadHost(_))
        ));
        assert!(matches!(MetricsAddr::parse(""), Err(AddrError::Empty)));
        assert!(matches!(MetricsAddr::parse("unix:"), Err(AddrError::Empty)));
        let unix = |p: &str| Some(MetricsAddr::Unix(p.into()));
        assert_eq!(MetricsAddr::parse("m.sock").ok(), unix("m.sock"));
        assert_eq!(
            MetricsAddr::parse("/run/q/m.sock").ok(),
            unix("/run/q/m.sock")
        );
        assert_eq!(
            MetricsAddr::parse("unix:/run/q:9100").ok(),
            unix("/run/q:9100")
        );
        assert_eq!(MetricsAddr::parse("./a:9100").ok(), unix("./a:9100"));
    }
}
