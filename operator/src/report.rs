//! The one reporting path for failed reconciles, shared by every controller.

use crate::context::Context;
use crate::error::Error;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

/// The one reporting path for failed reconciles: a log line, a metric and a Warning Event
/// with the reason and the error chain.
pub async fn report(
    ctx: &Context,
    controller: &'static str,
    reference: &ObjectReference,
    error: &Error,
) {
    ctx.metrics.reconcile_failed(controller, error.reason());
    let message = crate::conditions::event_note(&error.chain());
    warn!(
        controller,
        reason = error.reason(),
        namespace = reference.namespace.as_deref().unwrap_or_default(),
        name = reference.name.as_deref().unwrap_or_default(),
        "{message}"
    );
    let event = Event {
        type_: EventType::Warning,
        reason: error.reason().to_string(),
        note: Some(message),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(publish_error) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %publish_error, "cannot publish Event");
    }
}

// ---------------------------------------------------------------------------------------
// Wiring
