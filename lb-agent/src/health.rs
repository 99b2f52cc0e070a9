//! kube-proxy's health endpoints, so that cloud load balancers and existing probes keep
//! working once kube-proxy is gone: the proxy's own `/healthz` (port 10256 by default), and one
//! `healthCheckNodePort` server per `externalTrafficPolicy: Local` LoadBalancer, answering 200
//! only on nodes that have a local endpoint. Both speak kube-proxy's JSON.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{dataplane::conntrack::monotonic_ns, translate::HealthCheck};

/// A status, a content type and a body.
pub type Reply = (StatusCode, &'static str, String);

/// Serves HTTP/1 on `listener`, answering each request with `route(path)`.
pub async fn serve_routes(listener: TcpListener, route: impl Fn(&str) -> Reply + Clone + Send + Sync + 'static) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = route(req.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert("content-type", content_type.parse().expect("valid header"));
                response.headers_mut().insert("x-content-type-options", "nosniff".parse().expect("valid header"));
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                warn!("health connection: {e}");
            }
        });
    }
}

/// Whether the proxy keeps the datapath in sync: ready after the first full sync, and
/// unhealthy once no sync has succeeded for `timeout` (syncs keep failing).
#[derive(Clone)]
pub struct ProxyHealth {
    pub ready: Arc<AtomicBool>,
    /// CLOCK_MONOTONIC ns of the last sync that succeeded.
    pub last_ok_ns: Arc<AtomicU64>,
    /// Wall-clock seconds of the same, for kube-proxy's `lastUpdated`.
    pub last_ok_unix: Arc<AtomicU64>,
    pub timeout: Duration,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self { ready: Arc::new(AtomicBool::new(false)), last_ok_ns: Arc::new(AtomicU64::new(0)), last_ok_unix: Arc::new(AtomicU64::new(0)), timeout }
    }

    pub fn sync_succeeded(&self) {
        self.last_ok_ns.store(monotonic_ns(), Ordering::Release);
        self.last_ok_unix.store(unix_now(), Ordering::Release);
    }

    pub fn healthy(&self) -> bool {
        let age = monotonic_ns().saturating_sub(self.last_ok_ns.load(Ordering::Acquire));
        self.ready.load(Ordering::Acquire) && Duration::from_nanos(age) <= self.timeout
    }

    /// kube-proxy's `/healthz` and `/livez`.
    fn route(&self, path: &str) -> Reply {
        if path != "/healthz" && path != "/livez" {
            return (StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
        }
        let body = serde_json::json!({
            "lastUpdated": rfc3339(self.last_ok_unix.load(Ordering::Acquire)),
            "currentTime": rfc3339(unix_now()),
            "nodeEligible": true,
        });
        let status = if self.healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, "application/json", body.to_string())
    }
}

/// Serves the proxy's health on `addr` (kube-proxy's `--healthz-bind-address`).
pub async fn serve_proxy_health(addr: SocketAddr, health: ProxyHealth) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for the proxy health check"))?;
    info!("kube-proxy compatible health check on http://{addr}/healthz");
    serve_routes(listener, move |path| health.route(path)).await
}

/// One server per `healthCheckNodePort`, on every node address, opened and closed as
/// Services come and go.
pub struct ServiceHealthServers {
    proxy: ProxyHealth,
    servers: HashMap<u16, (Arc<Mutex<HealthCheck>>, JoinHandle<Result<()>>)>,
}

impl ServiceHealthServers {
    pub fn new(proxy: ProxyHealth) -> Self {
        Self { proxy, servers: HashMap::new() }
    }

    /// Makes the servers match `checks`. A port that cannot be bound is reported in the
    /// returned errors and tried again on the next call; the others are served.
    pub fn sync(&mut self, checks: &[HealthCheck]) -> Vec<String> {
        let wanted: HashMap<u16, &HealthCheck> = checks.iter().map(|c| (c.port, c)).collect();
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!("health check port {port} closed");
            }
            keep
        });
        let mut errors = Vec::new();
        for (port, check) in wanted {
            if let Some((current, _)) = self.servers.get(&port) {
                *current.lock().expect("not poisoned") = check.clone();
                continue;
            }
            match bind_any(port) {
                Ok(listener) => {
                    let state = Arc::new(Mutex::new(check.clone()));
                    let (route_state, proxy) = (state.clone(), self.proxy.clone());
                    let task = tokio::spawn(serve_routes(listener, move |_path: &str| service_reply(&route_state.lock().expect("not poisoned"), proxy.healthy())));
                    info!("health check for Service {}/{} on port {port}", check.namespace, check.name);
                    self.servers.insert(port, (state, task));
                }
                Err(e) => errors.push(format!("Service {}/{}: spec.healthCheckNodePort: {e:#}", check.namespace, check.name)),
            }
        }
        errors
    }
}

fn bind_any(port: u16) -> Result<TcpListener> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("listening on port {port}"))?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// kube-proxy's answer: 200 while this node has a local endpoint and the proxy is healthy.
fn service_reply(check: &HealthCheck, proxy_healthy: bool) -> Reply {
    let body = serde_json::json!({
        "service": { "namespace": check.namespace, "name": check.name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let status = if check.local_endpoints > 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, "application/json", body.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `2006-01-02T15:04:05Z` for seconds since the epoch (the civil-from-days algorithm).
fn rfc3339(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_737_600), "2026-11-27T00:00:00Z");
    }

    #[test]
    fn service_health_is_kube_proxys_json() {
        let check = HealthCheck { port: 32000, namespace: "demo".into(), name: "web".into(), local_endpoints: 2 };
        let (status, content_type, body) = service_reply(&check, true);
        assert_eq!((status, content_type), (StatusCode::OK, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, serde_json::json!({"service": {"namespace": "demo", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true}));
        assert_eq!(service_reply(&HealthCheck { local_endpoints: 0, ..check.clone() }, true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(service_reply(&check, false).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
