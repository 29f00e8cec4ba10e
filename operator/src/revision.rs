//! The one predicate schemagate exists for: is revision R applied in this database?
//!
//! Pure: no client, no database, no clock. The webhook, the gate backstop, the migration
//! plan and `schemagate check` all ask [`answer`], from what the database reported and
//! what is known about the tool's ordering (docs/probe.md):
//!
//! - tools that record every applied migration ([`Scheme::History`]): membership only.
//!   Numbers never stand in for membership: an out-of-order version merged late is
//!   routinely missing below the newest one.
//! - golang-migrate ([`Scheme::Ordered`]): one current version, applied strictly in order;
//!   satisfied when it is at least the required one (a dirty version never gets here: the
//!   probe reports it as an error).
//! - Alembic ([`Scheme::Graph`]): the database holds only the heads; the required revision
//!   is applied when it is a head or an ancestor of one in the revision graph that the
//!   migrator image's scripts define ([`Graph`]).
//!
//! When the answer cannot be known from what is at hand the predicate says so
//! ([`Answer::CannotTell`]): callers hold, and say why.

use schemagate_crds::{RevisionGraphStatus, RevisionNode, Tracking, TrackingTool};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// How many applied revisions `status.appliedRevisions` keeps (the newest).
pub const MAX_STATUS_REVISIONS: usize = 256;
/// The most a revision-graph report may hold: a container's termination message.
pub const MAX_GRAPH_REPORT: usize = 4096;
/// First line of a revision-graph report.
pub const GRAPH_REPORT_HEADER: &str = "schemagate-revision-graph v1";

/// How a tool's version table relates applied revisions to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Every applied migration is a row: applied means listed.
    History,
    /// One current version; versions apply in numeric order.
    Ordered,
    /// The current heads of a revision graph.
    Graph,
}

impl Scheme {
    /// The scheme of a tool; a custom query lists applied revisions, like a history tool.
    pub fn of(tracking: &Tracking) -> Self {
        match tracking.tool {
            Some(TrackingTool::Alembic) => Self::Graph,
            Some(TrackingTool::GolangMigrate) => Self::Ordered,
            Some(_) | None => Self::History,
        }
    }
}

/// What the database reported: for [`Scheme::History`] the applied set (oldest first), for
/// [`Scheme::Ordered`] the current version, for [`Scheme::Graph`] the heads.
#[derive(Clone, Copy, Debug)]
pub struct Applied<'a> {
    pub revisions: &'a [String],
    /// False when `revisions` is only part of what the database reported.
    pub complete: bool,
}

/// The answer to "is this revision applied?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Satisfied,
    /// Certainly not applied (yet).
    NotSatisfied,
    /// Not known from what is at hand; `why` says what is missing and what to do.
    CannotTell {
        why: String,
        kind: Undecided,
    },
}

/// What keeps the predicate from an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undecided {
    /// The status keeps only part of a long applied set: a fresh read decides.
    Truncated,
    /// No revision graph of the migrator image is known (yet).
    NoGraph,
    /// A database head the graph does not contain (applied by hand, or by a newer image).
    UnknownHead,
    /// The required revision is not in the graph.
    UnknownRevision,
    /// The graph was cut short above the required revision.
    CutShort,
    /// Not an integer, where golang-migrate's versions are.
    NotOrdered,
}

impl Undecided {
    /// Whether reading the database again (rather than a status) may decide it.
    pub fn fresh_read_helps(self) -> bool {
        self == Undecided::Truncated
    }
}

/// Whether `required` is applied, given what the database reported and, for Alembic, the
/// revision graph of the migrator image.
pub fn answer(
    scheme: Scheme,
    applied: Applied<'_>,
    graph: Option<&Graph>,
    required: &str,
) -> Answer {
    if applied.revisions.iter().any(|r| r == required) {
        return Answer::Satisfied;
    }
    match scheme {
        Scheme::History if applied.complete => Answer::NotSatisfied,
        Scheme::History => Answer::CannotTell {
            why: format!(
                "revision {required} is not among the newest {} applied revisions the status keeps",
                applied.revisions.len()
            ),
            kind: Undecided::Truncated,
        },
        Scheme::Ordered => ordered(applied.revisions, required),
        Scheme::Graph if applied.revisions.is_empty() => Answer::NotSatisfied,
        Scheme::Graph => match graph {
            Some(graph) => graph.answer(applied.revisions, required),
            None => Answer::CannotTell {
                why: format!(
                    "the database reports head {}, and the revision graph of the migrator image is not read yet, so whether {required} is an ancestor is not known",
                    applied.revisions.join(",")
                ),
                kind: Undecided::NoGraph,
            },
        },
    }
}

/// Whether `revisions`, read from a DatabaseMigration's database just now, satisfy its
/// spec's revision: [`answer`] with its tracking scheme and, for Alembic, the image's graph
/// in its status.
pub fn satisfies_spec(
    migration: &schemagate_crds::DatabaseMigration,
    revisions: &[String],
) -> bool {
    let graph = migration
        .status
        .as_ref()
        .and_then(|status| status.revision_graph.as_ref())
        .and_then(Graph::from_status);
    answer(
        Scheme::of(&migration.spec.database.tracking),
        Applied {
            revisions,
            complete: true,
        },
        graph.as_ref(),
        &migration.spec.revision,
    ) == Answer::Satisfied
}

fn ordered(current: &[String], required: &str) -> Answer {
    let Some(current) = current.last() else {
        return Answer::NotSatisfied;
    };
    match compare_versions(current, required) {
        Some(Ordering::Greater | Ordering::Equal) => Answer::Satisfied,
        Some(Ordering::Less) => Answer::NotSatisfied,
        None => Answer::CannotTell {
            why: format!(
                "golang-migrate versions are integers, but the database reports {current:?} and the Deployment needs {required:?}; fix the schemagate.dev/revision annotation"
            ),
            kind: Undecided::NotOrdered,
        },
    }
}

/// Compares two all-digit versions by numeric value, of any length; `None` when either is
/// not all digits.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    Some(a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
}

/// What `status.appliedRevision` shows: `required` when it is applied, else the current
/// head(s) or the newest applied revision; `None` when nothing is applied.
pub fn display(scheme: Scheme, applied: &[String], required: &str) -> Option<String> {
    if applied.iter().any(|r| r == required) {
        return Some(required.to_string());
    }
    match scheme {
        Scheme::Graph => (!applied.is_empty()).then(|| applied.join(",")),
        Scheme::History | Scheme::Ordered => applied.last().cloned(),
    }
}

/// The applied revisions a status keeps: the newest [`MAX_STATUS_REVISIONS`], and whether
/// any were left out.
pub fn for_status(applied: &[String]) -> (Vec<String>, bool) {
    let skip = applied.len().saturating_sub(MAX_STATUS_REVISIONS);
    (applied[skip..].to_vec(), skip > 0)
}

/// A revision graph: each revision's parents. Possibly cut short (`truncated`): then a
/// parent may be missing from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    parents: HashMap<String, Vec<String>>,
    /// The revisions in report order (heads first), to write them back out.
    order: Vec<String>,
    pub truncated: bool,
}

impl Graph {
    pub fn new(nodes: impl IntoIterator<Item = (String, Vec<String>)>, truncated: bool) -> Self {
        let mut graph = Graph {
            truncated,
            ..Default::default()
        };
        for (revision, parents) in nodes {
            if graph.parents.insert(revision.clone(), parents).is_none() {
                graph.order.push(revision);
            }
        }
        graph
    }

    /// The graph a status carries; `None` when it has none (not read, or failed).
    pub fn from_status(status: &RevisionGraphStatus) -> Option<Self> {
        if status.error.is_some() {
            return None;
        }
        Some(Self::new(
            status
                .revisions
                .iter()
                .map(|n| (n.revision.clone(), n.parents.clone())),
            status.truncated,
        ))
    }

    pub fn nodes(&self) -> Vec<RevisionNode> {
        self.order
            .iter()
            .map(|revision| RevisionNode {
                revision: revision.clone(),
                parents: self.parents.get(revision).cloned().unwrap_or_default(),
            })
            .collect()
    }

    pub fn contains(&self, revision: &str) -> bool {
        self.parents.contains_key(revision)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether `required` is one of `heads` or an ancestor of one.
    pub fn answer(&self, heads: &[String], required: &str) -> Answer {
        let unknown_heads: Vec<&str> = heads
            .iter()
            .filter(|h| !self.contains(h))
            .map(String::as_str)
            .collect();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = heads
            .iter()
            .map(String::as_str)
            .filter(|h| self.contains(h))
            .collect();
        let mut cut_short = false;
        while let Some(revision) = stack.pop() {
            // Only a revision of the graph counts: a parent beyond a cut is no revision.
            if revision == required && self.contains(revision) {
                return Answer::Satisfied;
            }
            if !seen.insert(revision) {
                continue;
            }
            match self.parents.get(revision) {
                Some(parents) => stack.extend(parents.iter().map(String::as_str)),
                None => cut_short = true,
            }
        }
        let listed = self.contains(required);
        if !unknown_heads.is_empty() {
            return Answer::CannotTell {
                why: format!(
                    "the database reports head {}, which the revision graph of the migrator image does not contain (applied by hand, or by a newer image?), so whether {required} is an ancestor is not known; run the migration from an image that ships it (update spec.migrator.image, or set annotation schemagate.dev/retry)",
                    unknown_heads.join(",")
                ),
                kind: Undecided::UnknownHead,
            };
        }
        if !listed {
            let cut = if self.truncated {
                format!(
                    " (only the newest {} revisions fit in its report)",
                    self.len()
                )
            } else {
                String::new()
            };
            return Answer::CannotTell {
                why: format!(
                    "revision {required} is not in the revision graph of the migrator image{cut}; check the Deployment's schemagate.dev/revision annotation, or point spec.migrator.image at an image whose migrations contain {required}"
                ),
                kind: Undecided::UnknownRevision,
            };
        }
        if cut_short {
            return Answer::CannotTell {
                why: format!(
                    "the revision graph of the migrator image was cut short (its report holds at most {MAX_GRAPH_REPORT} bytes), and {required} is not found above the cut"
                ),
                kind: Undecided::CutShort,
            };
        }
        Answer::NotSatisfied
    }

    /// Reads a revision-graph report (the graph Job's termination message):
    ///
    /// ```text
    /// schemagate-revision-graph v1
    /// <revision>                      its parent is the next line's revision
    /// <revision> <parent> [<parent>]  explicit parents (a merge point has several)
    /// <revision> -                    a base: no parents
    /// truncated                       optional last line: older revisions left out
    /// ```
    pub fn parse_report(report: &str) -> Result<Self, String> {
        let mut lines = report.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some(GRAPH_REPORT_HEADER) => {}
            Some(other) => {
                let shown: String = other.chars().take(200).collect();
                return Err(format!(
                    "the revision-graph report does not start with {GRAPH_REPORT_HEADER:?}: {shown}"
                ));
            }
            None => return Err("the revision-graph report is empty".to_string()),
        }
        let lines: Vec<&str> = lines.collect();
        let mut nodes = Vec::with_capacity(lines.len());
        let mut truncated = false;
        for (index, line) in lines.iter().enumerate() {
            if *line == "truncated" {
                truncated = true;
                break;
            }
            let mut words = line.split_whitespace();
            let Some(revision) = words.next() else {
                continue;
            };
            let rest: Vec<&str> = words.collect();
            let parents = match rest.as_slice() {
                ["-"] => Vec::new(),
                [] => match lines.get(index + 1) {
                    Some(next) if *next != "truncated" => next
                        .split_whitespace()
                        .next()
                        .map(|p| vec![p.to_string()])
                        .unwrap_or_default(),
                    // The last line before a cut: its parent is beyond the report.
                    Some(_) => vec![String::new()],
                    None => {
                        return Err(format!(
                            "the revision-graph report ends with {revision} without naming its parents"
                        ));
                    }
                },
                explicit => explicit.iter().map(|p| p.to_string()).collect(),
            };
            // An empty parent stands for one beyond the cut: never a revision id.
            let parents = parents
                .into_iter()
                .map(|p| if p.is_empty() { "?".to_string() } else { p })
                .collect();
            nodes.push((revision.to_string(), parents));
        }
        Ok(Self::new(nodes, truncated))
    }
}

/// The revision-graph command's built-in script (Python, run as `python3 -c SCRIPT CONFIG
/// NAME`): it reads the Alembic configuration, walks the scripts from the heads down and
/// writes a report of at most [`MAX_GRAPH_REPORT`] bytes to /dev/termination-log.
pub const ALEMBIC_GRAPH_SCRIPT: &str = r#"
import os, sys
out = os.environ.get("SCHEMAGATE_GRAPH_OUT", "/dev/termination-log")
try:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else os.environ.get("ALEMBIC_CONFIG", "alembic.ini")
    name = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else "alembic"
    script = ScriptDirectory.from_config(Config(path, ini_section=name))
    revisions = list(script.walk_revisions())
    lines = ["schemagate-revision-graph v1"]
    size = len(lines[0]) + 1
    cut = False
    for i, rev in enumerate(revisions):
        # Parents include depends_on: upgrading to a revision applies its dependencies too,
        # and Alembic then drops them from alembic_version like ancestors.
        down = getattr(rev, "_all_down_revisions", None)
        if down is None:
            down = rev.down_revision
        parents = [] if down is None else ([down] if isinstance(down, str) else list(down))
        following = revisions[i + 1].revision if i + 1 < len(revisions) else None
        if not parents:
            line = rev.revision + " -"
        elif len(parents) == 1 and parents[0] == following:
            line = rev.revision
        else:
            line = rev.revision + " " + " ".join(parents)
        length = len(line.encode("utf-8"))
        if size + length + 1 + len("truncated") + 1 > 4096:
            cut = True
            break
        lines.append(line)
        size += length + 1
    if cut:
        lines.append("truncated")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("revision graph: %d of %d revisions reported" % (len(lines) - 1 - int(cut), len(revisions)))
except Exception as error:
    message = "cannot read the Alembic revision graph: %s: %s" % (type(error).__name__, error)
    try:
        with open(out, "w") as f:
            f.write(message[:4000])
    except OSError:
        pass
    print(message, file=sys.stderr)
    sys.exit(1)
"#;

#[cfg(test)]
mod tests;
