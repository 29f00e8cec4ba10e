//! The predicate against a reference model, over generated histories and graphs. Each
//! property runs a few hundred cases from fixed seeds, so a failure names its seed and
//! replays the same way.

use super::*;

const CASES: u64 = 300;

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn complete(revisions: &[String]) -> Applied<'_> {
    Applied {
        revisions,
        complete: true,
    }
}

fn hex_id(rng: &mut fastrand::Rng) -> String {
    (0..12)
        .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
        .collect()
}

// ---- History tools: membership only -----------------------------------------------------

/// Timestamp versions of a long-lived project: applied in an order that is not numeric
/// (branches merged late), with gaps (versions not applied yet).
fn history_case(rng: &mut fastrand::Rng) -> (Vec<String>, Vec<String>) {
    let count = rng.usize(1..3000);
    let mut universe: Vec<String> = (0..count)
        .map(|i| format!("2025{:010}", i * 37 + rng.usize(0..30)))
        .collect();
    universe.dedup();
    let mut applied: Vec<String> = universe
        .iter()
        .filter(|_| rng.u8(0..10) < 8)
        .cloned()
        .collect();
    // Out of order: a few versions applied after newer ones.
    for _ in 0..rng.usize(0..20) {
        if applied.len() > 2 {
            let from = rng.usize(0..applied.len());
            let version = applied.remove(from);
            applied.push(version);
        }
    }
    (universe, applied)
}

#[test]
fn history_tools_answer_membership_and_never_order() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (universe, applied) = history_case(&mut rng);
        for _ in 0..20 {
            let required = &universe[rng.usize(0..universe.len())];
            let member = applied.contains(required);
            let got = answer(Scheme::History, complete(&applied), None, required);
            let want = if member {
                Answer::Satisfied
            } else {
                Answer::NotSatisfied
            };
            assert_eq!(got, want, "seed {seed}, required {required}");
        }
    }
}

#[test]
fn a_truncated_applied_set_never_decides_what_it_left_out() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (universe, applied) = history_case(&mut rng);
        let (kept, truncated) = for_status(&applied);
        assert_eq!(truncated, applied.len() > MAX_STATUS_REVISIONS);
        assert!(kept.len() <= MAX_STATUS_REVISIONS);
        let status = Applied {
            revisions: &kept,
            complete: !truncated,
        };
        for _ in 0..20 {
            let required = &universe[rng.usize(0..universe.len())];
            let member = applied.contains(required);
            match answer(Scheme::History, status, None, required) {
                Answer::Satisfied => assert!(member, "seed {seed}: released on a guess"),
                Answer::NotSatisfied => assert!(!member, "seed {seed}: applied, yet held"),
                Answer::CannotTell { kind, .. } => {
                    assert!(truncated, "seed {seed}: a complete set always decides");
                    assert!(kind.fresh_read_helps());
                }
            }
        }
    }
}

#[test]
fn the_incident_of_a_late_merged_rails_version_is_held() {
    let applied = strings(&["20250110120000", "20250301090000"]);
    assert_eq!(
        answer(Scheme::History, complete(&applied), None, "20250214083000"),
        Answer::NotSatisfied
    );
    let applied = strings(&["20250110120000", "20250301090000", "20250214083000"]);
    assert_eq!(
        answer(Scheme::History, complete(&applied), None, "20250214083000"),
        Answer::Satisfied
    );
}

#[test]
fn five_thousand_applied_versions_are_answered_quickly() {
    let applied: Vec<String> = (1..=5000).map(|v| v.to_string()).collect();
    let started = std::time::Instant::now();
    for required in ["1", "2500", "5000"] {
        assert_eq!(
            answer(Scheme::History, complete(&applied), None, required),
            Answer::Satisfied
        );
    }
    assert_eq!(
        answer(Scheme::History, complete(&applied), None, "5001"),
        Answer::NotSatisfied
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

// ---- golang-migrate: ordered versions -----------------------------------------------------

#[test]
fn golang_migrate_compares_numbers_of_any_length() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let current: u64 = rng.u64(0..30_000_000_000_000);
        let required: u64 = if rng.bool() {
            current
        } else {
            rng.u64(0..30_000_000_000_000)
        };
        let pad = "0".repeat(rng.usize(0..3));
        let reported = vec![format!("{pad}{current}")];
        let got = answer(
            Scheme::Ordered,
            complete(&reported),
            None,
            &required.to_string(),
        );
        let want = if current >= required {
            Answer::Satisfied
        } else {
            Answer::NotSatisfied
        };
        assert_eq!(got, want, "seed {seed}: {current} vs {required}");
    }
}

#[test]
fn golang_migrate_without_a_version_or_with_words_is_not_guessed() {
    assert_eq!(
        answer(Scheme::Ordered, complete(&[]), None, "3"),
        Answer::NotSatisfied
    );
    let reported = strings(&["7"]);
    assert!(matches!(
        answer(Scheme::Ordered, complete(&reported), None, "v3"),
        Answer::CannotTell { .. }
    ));
}

// ---- Alembic: ancestry in the revision graph ------------------------------------------------

/// A random revision graph: each revision has one parent, sometimes two (a merge point) or
/// none (a new base); branches arise wherever two revisions share a parent.
fn random_graph(rng: &mut fastrand::Rng, size: usize) -> Vec<(String, Vec<String>)> {
    let mut nodes: Vec<(String, Vec<String>)> = Vec::with_capacity(size);
    for i in 0..size {
        let id = hex_id(rng);
        let parents = if i == 0 || rng.u8(0..100) < 2 {
            Vec::new()
        } else {
            // Mostly the newest revisions: long chains with short branches.
            let pick = |rng: &mut fastrand::Rng| {
                let reach = if rng.u8(0..10) < 8 { 2 } else { 8 };
                let back = rng.usize(1..=i.min(reach));
                nodes[i - back].0.clone()
            };
            let first = pick(rng);
            let mut parents = vec![first];
            if rng.u8(0..10) == 0 {
                let second = pick(rng);
                if !parents.contains(&second) {
                    parents.push(second);
                }
            }
            parents
        };
        nodes.push((id, parents));
    }
    // Newest first, as Alembic walks from the heads down.
    nodes.reverse();
    nodes
}

fn ancestors(nodes: &[(String, Vec<String>)], from: &[String]) -> HashSet<String> {
    let parents: HashMap<&str, &Vec<String>> = nodes.iter().map(|(r, p)| (r.as_str(), p)).collect();
    let mut seen = HashSet::new();
    let mut stack: Vec<String> = from.to_vec();
    while let Some(revision) = stack.pop() {
        if seen.insert(revision.clone())
            && let Some(parents) = parents.get(revision.as_str())
        {
            stack.extend(parents.iter().cloned());
        }
    }
    seen
}

/// The database after migrating to some revisions: its applied set and its heads.
fn database_heads(
    rng: &mut fastrand::Rng,
    nodes: &[(String, Vec<String>)],
) -> (HashSet<String>, Vec<String>) {
    let targets: Vec<String> = (0..rng.usize(1..4))
        .map(|_| nodes[rng.usize(0..nodes.len())].0.clone())
        .collect();
    let applied = ancestors(nodes, &targets);
    let below: HashSet<String> = nodes
        .iter()
        .filter(|(r, _)| applied.contains(r))
        .flat_map(|(_, p)| p.iter().cloned())
        .collect();
    let heads = applied
        .iter()
        .filter(|r| !below.contains(*r))
        .cloned()
        .collect();
    (applied, heads)
}

/// The report the built-in script writes, the same way, for a graph in walk order.
fn render_report(nodes: &[(String, Vec<String>)], limit: usize) -> String {
    let mut lines = vec![GRAPH_REPORT_HEADER.to_string()];
    let mut size = GRAPH_REPORT_HEADER.len() + 1;
    let mut cut = false;
    for (index, (revision, parents)) in nodes.iter().enumerate() {
        let following = nodes.get(index + 1).map(|(r, _)| r);
        let line = if parents.is_empty() {
            format!("{revision} -")
        } else if parents.len() == 1 && Some(&parents[0]) == following {
            revision.clone()
        } else {
            format!("{revision} {}", parents.join(" "))
        };
        if size + line.len() + 1 + "truncated".len() + 1 > limit {
            cut = true;
            break;
        }
        size += line.len() + 1;
        lines.push(line);
    }
    if cut {
        lines.push("truncated".to_string());
    }
    lines.join("\n") + "\n"
}

#[test]
fn alembic_ancestors_of_any_head_are_applied_and_nothing_else() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let size = rng.usize(1..400);
        let nodes = random_graph(&mut rng, size);
        let graph = Graph::new(nodes.clone(), false);
        let (applied, heads) = database_heads(&mut rng, &nodes);
        for (required, _) in &nodes {
            let got = answer(Scheme::Graph, complete(&heads), Some(&graph), required);
            let want = if applied.contains(required) {
                Answer::Satisfied
            } else {
                Answer::NotSatisfied
            };
            assert_eq!(
                got, want,
                "seed {seed}, required {required}, heads {heads:?}"
            );
        }
    }
}

#[test]
fn alembic_graph_cut_short_never_guesses() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let size = rng.usize(1..900);
        let nodes = random_graph(&mut rng, size);
        let report = render_report(&nodes, MAX_GRAPH_REPORT);
        assert!(
            report.len() <= MAX_GRAPH_REPORT,
            "seed {seed}: report too long"
        );
        let graph = Graph::parse_report(&report).unwrap();
        let (applied, heads) = database_heads(&mut rng, &nodes);
        for (required, _) in &nodes {
            let got = answer(Scheme::Graph, complete(&heads), Some(&graph), required);
            let member = applied.contains(required);
            match got {
                Answer::Satisfied => assert!(member, "seed {seed}: {required} released on a guess"),
                Answer::NotSatisfied => {
                    assert!(!member, "seed {seed}: {required} applied, yet held")
                }
                Answer::CannotTell { .. } => {
                    assert!(graph.truncated, "seed {seed}: a whole graph always decides")
                }
            }
        }
    }
}

#[test]
fn alembic_report_round_trips_a_whole_graph() {
    for seed in 0..CASES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let size = rng.usize(1..100);
        let nodes = random_graph(&mut rng, size);
        let report = render_report(&nodes, usize::MAX);
        let graph = Graph::parse_report(&report).unwrap();
        assert!(!graph.truncated);
        assert_eq!(graph, Graph::new(nodes, false), "seed {seed}");
    }
}

#[test]
fn alembic_branches_merges_and_several_heads() {
    // base -> a -> b -> (c1 | c2) -> m (merge) ; a second branch d off a.
    let nodes = vec![
        ("m".to_string(), strings(&["c1", "c2"])),
        ("c1".to_string(), strings(&["b"])),
        ("c2".to_string(), strings(&["b"])),
        ("d".to_string(), strings(&["a"])),
        ("b".to_string(), strings(&["a"])),
        ("a".to_string(), vec![]),
    ];
    let graph = Graph::new(nodes, false);
    let heads = strings(&["c1", "d"]);
    let ask = |required| answer(Scheme::Graph, complete(&heads), Some(&graph), required);
    assert_eq!(ask("a"), Answer::Satisfied);
    assert_eq!(ask("b"), Answer::Satisfied);
    assert_eq!(ask("d"), Answer::Satisfied);
    assert_eq!(ask("c2"), Answer::NotSatisfied);
    assert_eq!(ask("m"), Answer::NotSatisfied);
    assert!(
        matches!(ask("zz"), Answer::CannotTell { why, .. } if why.contains("not in the revision graph"))
    );
    let merged = strings(&["m"]);
    assert_eq!(
        answer(Scheme::Graph, complete(&merged), Some(&graph), "c2"),
        Answer::Satisfied
    );
    // A head the image does not ship (a hotfix applied by hand) decides nothing.
    let hotfix = strings(&["f00d"]);
    assert!(matches!(
        answer(Scheme::Graph, complete(&hotfix), Some(&graph), "a"),
        Answer::CannotTell { why, .. } if why.contains("f00d")
    ));
    // No graph yet: only the head itself is known applied.
    assert_eq!(
        answer(Scheme::Graph, complete(&heads), None, "d"),
        Answer::Satisfied
    );
    assert!(matches!(
        answer(Scheme::Graph, complete(&heads), None, "a"),
        Answer::CannotTell { .. }
    ));
    // Nothing applied: certainly not applied, graph or not.
    assert_eq!(
        answer(Scheme::Graph, complete(&[]), None, "a"),
        Answer::NotSatisfied
    );
}

#[test]
fn a_revision_beyond_the_cut_is_never_a_match() {
    // The last line before the cut has its parent beyond the report.
    let graph = Graph::parse_report(&format!("{GRAPH_REPORT_HEADER}\nb\na\ntruncated\n")).unwrap();
    let heads = strings(&["b"]);
    for required in ["?", "", "truncated"] {
        assert!(
            !matches!(
                answer(Scheme::Graph, complete(&heads), Some(&graph), required),
                Answer::Satisfied
            ),
            "{required:?} released"
        );
    }
    assert_eq!(
        answer(Scheme::Graph, complete(&heads), Some(&graph), "a"),
        Answer::Satisfied
    );
}

#[test]
fn report_parsing_rejects_what_is_not_a_report() {
    assert!(Graph::parse_report("").is_err());
    assert!(Graph::parse_report("Traceback (most recent call last):").is_err());
    assert!(Graph::parse_report(&format!("{GRAPH_REPORT_HEADER}\nabc\n")).is_err());
    let graph = Graph::parse_report(&format!("{GRAPH_REPORT_HEADER}\nb\na -\n")).unwrap();
    assert_eq!(graph.nodes()[0].parents, strings(&["a"]));
    assert!(graph.nodes()[1].parents.is_empty());
}

#[test]
fn display_shows_the_required_revision_or_the_newest() {
    let history = strings(&["1", "3", "2"]);
    assert_eq!(
        display(Scheme::History, &history, "3").as_deref(),
        Some("3")
    );
    assert_eq!(
        display(Scheme::History, &history, "4").as_deref(),
        Some("2")
    );
    let heads = strings(&["ab", "cd"]);
    assert_eq!(
        display(Scheme::Graph, &heads, "ef").as_deref(),
        Some("ab,cd")
    );
    assert_eq!(display(Scheme::Ordered, &[], "1"), None);
}
