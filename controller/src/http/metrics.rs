//! `GET /metrics`: the controller's Prometheus metrics.
//!
//! Served without a token only while the API listens on loopback (a scraper
//! there is on this host); otherwise it needs the API token like every
//! route, which Prometheus sends with `authorization: {credentials_file: …}`.
//! The metrics name hosts and GPUs but no job, command or environment.

use super::{State, unavailable};
use crate::actor::MetricsSnapshot;
use actix_web::{HttpResponse, web};

/// Registers the route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics));
}

async fn metrics(state: web::Data<State>) -> HttpResponse {
    let Ok(mut snap) = state.core.send(MetricsSnapshot).await else {
        return unavailable();
    };
    let shared = state.shared.clone();
    // Jobs by state from the store (an indexed count), not from a walk of every job in the core's thread.
    let counted = web::block(move || {
        let reader = shared.reader.lock().unwrap_or_else(|p| p.into_inner());
        reader.count_jobs_by_state()
    })
    .await;
    match counted {
        Ok(Ok(jobs)) => snap.jobs = jobs,
        Ok(Err(e)) => return super::internal(e),
        Err(e) => return super::internal(e),
    }
    HttpResponse::Ok().content_type(crate::metrics::CONTENT_TYPE).body(state.shared.metrics.render(&snap))
}
