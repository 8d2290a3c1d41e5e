//! The admin listener (HTTP/1.1, loopback by default): `/live`, `/ready`, `/metrics`,
//! `/config`, `/endpoints`, and `/dashboard`, a page with no external assets that charts the
//! sidecar's own per-second series.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::accept::Listener;
use crate::body::{full, ProxyBody};
use crate::config::Config;
use crate::outbound::Outbound;
use crate::telemetry::Telemetry;

/// What the admin endpoints read.
pub(crate) struct Admin {
    pub telemetry: Arc<Telemetry>,
    pub config: Config,
    pub outbound: Arc<Outbound>,
    pub started: std::time::Instant,
}

/// How long `/ready` waits for discovery to deliver every service's first endpoints before it
/// says ready anyway (a service whose discovery is broken must not keep the pod unready
/// forever; its requests get `503 no-endpoints` with the reason).
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Ready once everything is bound and every service has endpoints (or `READY_WAIT` passed).
fn ready(admin: &Admin) -> Response<ProxyBody> {
    if !admin.telemetry.is_ready() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n");
    }
    if !admin.outbound.has_endpoints() && admin.started.elapsed() < READY_WAIT {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first endpoints of every service\n",
        );
    }
    text(StatusCode::OK, "ready\n")
}

pub(crate) async fn serve(listener: Listener, admin: Arc<Admin>, shutdown: CancellationToken) {
    while let Some((stream, _)) = listener.accept(&shutdown).await {
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(req, &admin)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

fn route(req: Request<Incoming>, admin: &Admin) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "admin endpoints are read-only (GET)\n",
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => ready(admin),
        "/metrics" => with_type(
            StatusCode::OK,
            admin.telemetry.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/config" => json(&redacted(&admin.config)),
        "/endpoints" => json(&admin.outbound.endpoints()),
        "/dashboard" | "/dashboard/" => with_type(
            StatusCode::OK,
            DASHBOARD.to_string(),
            "text/html; charset=utf-8",
        ),
        "/dashboard/data" => json(&admin.telemetry.dashboard_data()),
        "/" => text(
            StatusCode::OK,
            "quicar admin: /live /ready /metrics /config /endpoints /dashboard\n",
        ),
        other => text(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint {other}\n"),
        ),
    }
}

/// The effective config; the key file's location is not shown.
fn redacted(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
    if let Some(key) = v.pointer_mut("/identity/key") {
        *key = serde_json::Value::String("<redacted>".into());
    }
    v
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    with_type(status, body.to_string(), "text/plain; charset=utf-8")
}

fn json<T: serde::Serialize>(value: &T) -> Response<ProxyBody> {
    match serde_json::to_string_pretty(value) {
        Ok(s) => with_type(StatusCode::OK, s, "application/json"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render: {e}\n"),
        ),
    }
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Self-contained: inline CSS and JS, charts drawn as SVG from `/dashboard/data` every second.
const DASHBOARD: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quicar dashboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 8px} .grid{display:grid;grid-template-columns:repeat(2,1fr);gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card h2{font-size:14px;margin:0 0 4px} svg{width:100%;height:180px;background:#fff}
.legend{font-size:12px} .legend span{margin-right:10px;white-space:nowrap}
.empty{fill:#999;font-size:12px} #status{color:#666;font-size:12px}
</style></head><body>
<h1>quicar — live traffic</h1><div id="status">loading…</div>
<div class="grid">
<div class="card"><h2>Requests per second</h2><svg id="rate" data-points="0"></svg><div class="legend" id="rate-l"></div></div>
<div class="card"><h2>p50 latency (ms)</h2><svg id="p50" data-points="0"></svg><div class="legend" id="p50-l"></div></div>
<div class="card"><h2>p99 latency (ms)</h2><svg id="p99" data-points="0"></svg><div class="legend" id="p99-l"></div></div>
<div class="card"><h2>Sidecar errors per second, by kind</h2><svg id="errors" data-points="0"></svg><div class="legend" id="errors-l"></div></div>
<div class="card"><h2>QUIC RTT (ms) per peer</h2><svg id="rtt" data-points="0"></svg><div class="legend" id="rtt-l"></div></div>
<div class="card"><h2>QUIC loss (% of datagrams) per peer</h2><svg id="loss" data-points="0"></svg><div class="legend" id="loss-l"></div></div>
<div class="card"><h2>Cache hit ratio per service</h2><svg id="cache" data-points="0"></svg><div class="legend" id="cache-l"></div></div>
</div>
<script>
const COLORS=["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf"];
function draw(id, series){
  const svg=document.getElementById(id), W=svg.clientWidth||600, H=180, P=30;
  const names=Object.keys(series||{}); let max=0, n=0, points=0;
  for(const k of names){ for(const v of series[k]){ if(v!==null&&v!==undefined){ max=Math.max(max,v); points++; } } n=Math.max(n,series[k].length); }
  let out=""; svg.setAttribute("data-points", String(points));
  if(points===0){ svg.innerHTML='<text class="empty" x="10" y="20">no data yet</text>'; document.getElementById(id+"-l").innerHTML=""; return; }
  if(max===0) max=1;
  for(let i=0;i<=4;i++){ const y=P/2+(H-P)*(1-i/4); out+=`<line x1="${P}" x2="${W}" y1="${y}" y2="${y}" stroke="#eee"/><text x="0" y="${y+4}" font-size="10" fill="#666">${(max*i/4).toPrecision(3)}</text>`; }
  names.forEach((k,j)=>{ const pts=[]; series[k].forEach((v,i)=>{ if(v!==null&&v!==undefined){ const x=P+(W-P)*(n<2?1:i/(n-1)); const y=P/2+(H-P)*(1-v/max); pts.push(x.toFixed(1)+","+y.toFixed(1)); } });
    out+=`<polyline class="series" fill="none" stroke-width="2" stroke="${COLORS[j%COLORS.length]}" points="${pts.join(" ")}"/>`; });
  svg.innerHTML=out;
  document.getElementById(id+"-l").innerHTML=names.map((k,j)=>`<span style="color:${COLORS[j%COLORS.length]}">■ ${k}</span>`).join("");
}
async function refresh(){
  try{
    const d=await (await fetch("/dashboard/data",{cache:"no-store"})).json();
    draw("rate",d.rate); draw("p50",d.p50_ms); draw("p99",d.p99_ms); draw("errors",d.errors);
    draw("rtt",d.quic_rtt_ms); draw("loss",d.quic_loss_pct); draw("cache",d.cache_hit_ratio);
    document.getElementById("status").textContent="updated "+new Date().toLocaleTimeString()+" · "+d.t.length+" s of history";
  }catch(e){ document.getElementById("status").textContent="cannot reach the sidecar: "+e; }
}
refresh(); setInterval(refresh,1000);
</script></body></html>
"##;
