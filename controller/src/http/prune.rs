//! `POST /v1/jobs/prune?before_ms=N`: removes finished jobs that ended
//! before N (ms since the epoch) with their attempts, events and logs, then
//! the blobs nothing references; answers what it removed (`cosmos jobs prune`).

use super::{State, error};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

/// The routes; registered before `/v1/jobs/{id}` so `prune` is not taken for an id.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/jobs/prune", web::post().to(prune));
}

#[derive(Deserialize)]
struct PruneQuery {
    before_ms: u64,
}

async fn prune(state: web::Data<State>, q: web::Query<PruneQuery>) -> HttpResponse {
    let now = crate::shared::wall_ms();
    if q.before_ms > now {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("before_ms {} is in the future (now is {now}); give a time that has passed", q.before_ms),
            None,
            false,
        );
    }
    let why = format!("finished before {} ms since the epoch (cosmos jobs prune --before)", q.before_ms);
    match crate::retention::prune(&state.core, &state.shared, q.before_ms, &why).await {
        Ok(pruned) => HttpResponse::Ok().json(pruned),
        Err(e @ crate::retention::PruneError::Stopping) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None, true)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None, true),
    }
}
