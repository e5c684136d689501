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
    let Ok(snap) = state.core.send(MetricsSnapshot).await else {
        return unavailable();
    };
    HttpResponse::Ok().content_type(crate::metrics::CONTENT_TYPE).body(state.shared.metrics.render(&snap))
}
