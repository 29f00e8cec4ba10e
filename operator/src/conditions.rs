//! Status conditions after the Kubernetes conventions: one helper sets a condition, keeps
//! `lastTransitionTime` while the status stays the same, and records `observedGeneration`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// `True`, `False` or `Unknown`, as Kubernetes spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Conditions are bounded: a message longer than this is cut, keeping its end.
pub const MAX_MESSAGE_LEN: usize = 2048;

/// Sets condition `type_`, replacing one of the same type. The transition time changes only
/// when the status does.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let message = truncate_start(message, MAX_MESSAGE_LEN);
    let last_transition_time = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status.as_str())
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let condition = Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

/// The condition of that type, if set.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of that type is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == Status::True.as_str())
}

/// The most an Event note may hold (events.k8s.io/v1 rejects longer ones), in bytes.
pub const MAX_EVENT_NOTE: usize = 1024;
const ELLIPSIS: &str = "…";

/// Keeps at most `max` bytes of `text`, the mark of the cut included, from its end (the
/// end of a log says what failed), on a character boundary.
pub fn truncate_start(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{ELLIPSIS}{}", &text[start..])
}

/// An Event note within [`MAX_EVENT_NOTE`] bytes: a longer text keeps its beginning (what
/// happened and why) and its end (the last lines of a migrator's output), cut in between.
pub fn event_note(text: &str) -> String {
    if text.len() <= MAX_EVENT_NOTE {
        return text.to_string();
    }
    let mut head_end = MAX_EVENT_NOTE / 2;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let tail_len = MAX_EVENT_NOTE - head_end - ELLIPSIS.len();
    let mut tail_start = text.len() - tail_len;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!("{}{ELLIPSIS}{}", &text[..head_end], &text[tail_start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn keeps_transition_time_while_status_is_unchanged() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            "Ready",
            Status::False,
            "Pending",
            "a",
            Some(1),
            at(10),
        );
        set_condition(
            &mut conditions,
            "Ready",
            Status::False,
            "Running",
            "b",
            Some(2),
            at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].reason, "Running");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(
            &mut conditions,
            "Ready",
            Status::True,
            "Applied",
            "c",
            Some(2),
            at(30),
        );
        assert_eq!(conditions[0].last_transition_time, Time(at(30)));
        assert!(is_true(&conditions, "Ready"));
    }

    #[test]
    fn event_notes_fit_the_apis_limit_and_keep_both_ends() {
        for length in [0, 10, 1023, 1024, 1025, 5000] {
            for filler in ["x", "é", "日"] {
                let text = format!("held: needs 0002{}Traceback end", filler.repeat(length));
                let note = event_note(&text);
                assert!(
                    note.len() <= MAX_EVENT_NOTE,
                    "{length} {filler}: {}",
                    note.len()
                );
                assert!(note.starts_with("held: needs 0002"));
                assert!(note.ends_with("Traceback end"));
            }
        }
        let cut = truncate_start(&"é".repeat(2000), MAX_EVENT_NOTE);
        assert!(cut.len() <= MAX_EVENT_NOTE, "{}", cut.len());
    }

    #[test]
    fn truncates_from_the_start_on_char_boundaries() {
        assert_eq!(truncate_start("short", 10), "short");
        let cut = truncate_start("ééééé-end", 7);
        assert!(cut.len() <= 7);
        assert!(cut.ends_with("-end"));
        assert!(cut.starts_with('…'));
    }
}
