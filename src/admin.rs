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
        "/dashboard/data" => json(&DashboardView {
            data: admin.telemetry.dashboard_data(),
            features: Features {
                cache: admin.config.service.iter().any(|s| s.cache.is_some()),
                services: !admin.config.service.is_empty(),
                inbound: !admin.config.local.is_empty(),
            },
        }),
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

/// `/dashboard/data`: the series, and which features are configured (the page shows cards
/// only for those).
#[derive(serde::Serialize)]
struct DashboardView {
    #[serde(flatten)]
    data: crate::telemetry::DashboardData,
    features: Features,
}

#[derive(serde::Serialize)]
struct Features {
    cache: bool,
    services: bool,
    inbound: bool,
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
h1{font-size:18px;margin:0 0 4px} .grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card.wide{grid-column:1 / span 2} .card h2{font-size:14px;margin:0 0 4px}
.card p.note{font-size:12px;color:#666;margin:0 0 4px}
svg{width:100%;height:170px;background:#fff} .legend{font-size:12px}
.legend span{margin-right:12px;white-space:nowrap} .empty{fill:#999;font-size:12px}
#status{color:#666;font-size:12px;margin-bottom:8px}
table{border-collapse:collapse;font-size:12px;width:100%} th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eee}
th{color:#555;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.open{color:#d62728;font-weight:600} .half-open{color:#ff7f0e} .closed{color:#2ca02c}
.hidden{display:none}
</style></head><body>
<h1>quicar — live traffic</h1><div id="status">loading…</div>
<div class="grid">
<div class="card wide" id="compare-card"><h2>QUIC and TCP side by side, per service</h2>
<p class="note">Requests per second and latency over the last minute, for each service called over each transport.</p>
<table id="compare" data-rows="0"><thead><tr><th>service</th><th>transport</th><th class="num">requests/s</th><th class="num">p50</th><th class="num">p99</th><th class="num">requests (15 min)</th></tr></thead><tbody></tbody></table></div>
<div class="card"><h2>Requests per second</h2><svg id="rate" data-points="0"></svg><div class="legend" id="rate-l"></div></div>
<div class="card"><h2>Median latency (p50)</h2><svg id="p50" data-points="0"></svg><div class="legend" id="p50-l"></div></div>
<div class="card"><h2>Tail latency (p99)</h2><svg id="p99" data-points="0"></svg><div class="legend" id="p99-l"></div></div>
<div class="card"><h2>Errors made by the sidecar, per second</h2><svg id="errors" data-points="0"></svg><div class="legend" id="errors-l"></div></div>
<div class="card" id="cache-card"><h2>Cache hit ratio</h2><svg id="cache" data-points="0"></svg><div class="legend" id="cache-l"></div></div>
<div class="card"><h2>QUIC round-trip time per peer</h2><svg id="rtt" data-points="0"></svg><div class="legend" id="rtt-l"></div></div>
<div class="card wide" id="endpoints-card"><h2>Endpoints</h2>
<table id="endpoints" data-rows="0"><thead><tr><th>service</th><th>endpoint</th><th>transport</th><th>breaker</th><th class="num">latency estimate</th><th class="num">outstanding</th><th>connected</th><th>last error</th></tr></thead><tbody></tbody></table></div>
<div class="card wide" id="peers-card"><h2>QUIC connections to peers</h2>
<table id="peers" data-rows="0"><thead><tr><th>peer</th><th class="num">round trip</th><th class="num">congestion window</th><th class="num">loss</th><th class="num">sampled</th></tr></thead><tbody></tbody></table></div>
</div>
<script>
const COLORS=["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf"];
// Human units: 16.6k/s, 0.56 ms, 1.2 s, 4.2 %, 64 KiB.
function num(v){ const a=Math.abs(v); if(a>=1e6) return (v/1e6).toFixed(a>=1e7?0:1)+"M"; if(a>=1e3) return (v/1e3).toFixed(a>=1e4?0:1)+"k"; if(a>=10||a===0) return v.toFixed(0); if(a>=1) return v.toFixed(1); return v.toFixed(2); }
function fmt(v,unit){ if(v===null||v===undefined) return "–"; if(v===0) return unit==="/s"?"0/s":unit==="ms"?"0 ms":unit==="ratio"||unit==="%"?"0 %":"0";
  if(unit==="ms"){ if(v>=1000) return (v/1000).toFixed(v>=10000?0:1)+" s"; if(v>=10) return v.toFixed(0)+" ms"; if(v>=1) return v.toFixed(1)+" ms"; return v.toFixed(2)+" ms"; }
  if(unit==="%") return (v>=10?v.toFixed(0):v.toFixed(1))+" %";
  if(unit==="ratio") return (100*v).toFixed(0)+" %";
  if(unit==="bytes"){ if(v>=1048576) return (v/1048576).toFixed(1)+" MiB"; if(v>=1024) return (v/1024).toFixed(0)+" KiB"; return v+" B"; }
  if(unit==="/s") return num(v)+"/s";
  return num(v); }
function clock(unix){ const d=new Date(unix*1000); return d.toLocaleTimeString([], {hour:"2-digit",minute:"2-digit",second:"2-digit",hour12:false}); }
function draw(id, series, unit, d){
  const svg=document.getElementById(id), W=svg.clientWidth||600, H=170, L=58, B=18, T=6;
  const names=Object.keys(series||{}); let max=0, points=0; const n=d.t.length;
  for(const k of names){ for(const v of series[k]){ if(v!==null&&v!==undefined){ max=Math.max(max,v); points++; } } }
  svg.setAttribute("data-points", String(points));
  const legend=document.getElementById(id+"-l");
  if(points===0){ svg.innerHTML='<text class="empty" x="10" y="20">no traffic yet</text>'; legend.innerHTML=""; return; }
  if(unit==="ratio") max=1; if(max===0) max=1;
  const x=i=>L+(W-L-4)*(n<2?1:i/(n-1)), y=v=>T+(H-T-B)*(1-v/max);
  let out="";
  for(let i=0;i<=4;i++){ const v=max*i/4; out+=`<line x1="${L}" x2="${W}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/><text class="axis" x="${L-4}" y="${y(v)+4}" font-size="10" fill="#666" text-anchor="end">${fmt(v,unit)}</text>`; }
  // A time axis: five wall-clock labels.
  for(let j=0;j<5&&n>1;j++){ const i=Math.round((n-1)*j/4); out+=`<text class="time" x="${x(i)}" y="${H-4}" font-size="10" fill="#666" text-anchor="${j===0?"start":j===4?"end":"middle"}">${clock(d.start_unix+d.t[i])}</text>`; }
  names.forEach((k,j)=>{ const c=COLORS[j%COLORS.length]; let run=[];
    const flush=()=>{ if(run.length>1) out+=`<polyline class="series" fill="none" stroke-width="2" stroke="${c}" points="${run.join(" ")}"/>`; else if(run.length===1){ const [px,py]=run[0].split(","); out+=`<circle cx="${px}" cy="${py}" r="2" fill="${c}"/>`; } run=[]; };
    // No traffic, no line: a gap where a value is missing (idle seconds have no latency).
    series[k].forEach((v,i)=>{ if(v===null||v===undefined) flush(); else run.push(x(i).toFixed(1)+","+y(v).toFixed(1)); }); flush(); });
  svg.innerHTML=out;
  legend.innerHTML=names.map((k,j)=>`<span style="color:${COLORS[j%COLORS.length]}">■ ${k}</span>`).join(" ");
}
const last=(a,k)=>{ const s=a.slice(-k).filter(v=>v!==null&&v!==undefined); return s; };
const mean=a=>a.length?a.reduce((x,y)=>x+y,0)/a.length:null;
function rows(id, html){ const t=document.getElementById(id); t.querySelector("tbody").innerHTML=html.join(""); t.setAttribute("data-rows", String(html.length)); }
async function refresh(){
  try{
    const d=await (await fetch("/dashboard/data",{cache:"no-store"})).json();
    document.getElementById("cache-card").classList.toggle("hidden", !d.features.cache);
    document.getElementById("compare-card").classList.toggle("hidden", !d.features.services);
    document.getElementById("endpoints-card").classList.toggle("hidden", !d.features.services);
    draw("rate",d.rate,"/s",d); draw("p50",d.p50_ms,"ms",d); draw("p99",d.p99_ms,"ms",d); draw("errors",d.errors,"/s",d);
    draw("rtt",d.quic_rtt_ms,"ms",d); if(d.features.cache) draw("cache",d.cache_hit_ratio,"ratio",d);
    const cmp=[]; for(const [svc,byT] of Object.entries(d.compare)){ for(const [t,c] of Object.entries(byT)){
      cmp.push(`<tr data-service="${svc}" data-transport="${t}"><td>${svc}</td><td>${t==="quic"?"QUIC (HTTP/3)":"TCP (TLS + HTTP/2)"}</td><td class="num">${fmt(mean(c.rate.slice(-60))||0,"/s")}</td><td class="num">${fmt(mean(last(c.p50_ms,60)),"ms")}</td><td class="num">${fmt(mean(last(c.p99_ms,60)),"ms")}</td><td class="num">${num(c.requests)}</td></tr>`); } }
    rows("compare", cmp);
    const peers=Object.entries(d.peers).map(([p,s])=>`<tr><td>${p}</td><td class="num">${fmt(s.rtt_ms,"ms")}</td><td class="num">${fmt(s.cwnd_bytes,"bytes")}</td><td class="num">${fmt(s.loss_pct,"%")}</td><td class="num">${s.seconds_ago} s ago</td></tr>`);
    rows("peers", peers); document.getElementById("peers-card").classList.toggle("hidden", peers.length===0);
    if(d.features.services){ const eps=await (await fetch("/endpoints",{cache:"no-store"})).json(); const er=[];
      for(const s of eps){ for(const e of s.endpoints){ er.push(`<tr><td>${s.name}</td><td>${e.address}</td><td>${e.transport==="quic"?"QUIC":"TCP"}</td><td class="${e.breaker}">${e.breaker==="closed"?"healthy":e.breaker==="open"?"ejected":"probing"}</td><td class="num">${fmt(e.latency_ewma_ms,"ms")}</td><td class="num">${e.outstanding}</td><td>${e.connected?"yes":"no"}</td><td>${e.last_error||""}</td></tr>`); } }
      rows("endpoints", er); }
    const secs=d.t.length; document.getElementById("status").textContent="updated "+new Date().toLocaleTimeString()+" · "+(secs>=120?Math.round(secs/60)+" min":secs+" s")+" of history (up to 15 min)";
  }catch(e){ document.getElementById("status").textContent="cannot reach the sidecar: "+e; }
}
refresh(); setInterval(refresh,1000);
</script></body></html>
"##;
