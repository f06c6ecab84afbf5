//! Tables (Markdown, so a run can be pasted into `bench-results/`) and
//! charts of the experiments' results.

use std::fmt::Write;

use crate::chart::{Bar, BarChart};
use crate::experiments::balance::{Balance, Exit};
use crate::experiments::memory::{Memory, Phase};
use crate::experiments::rcu_free::RcuFree;
use crate::experiments::spawn_cost::SpawnCost;

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Experiment 1 as a table.
pub fn spawn_cost_table(r: &SpawnCost) -> String {
    let mut out = format!(
        "Stack cost per spawn ({} KiB stacks, one thread on CPU {}; create coroutine + run + exit)\n\n\
         | stack | median ns/spawn | min | max |\n|---|---:|---:|---:|\n",
        r.stack_size / 1024,
        r.cpu
    );
    for row in &r.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} |",
            row.kind, row.median_ns, row.min_ns, row.max_ns
        );
    }
    out
}

/// Experiment 1 as a chart.
pub fn spawn_cost_chart(r: &SpawnCost) -> BarChart {
    BarChart {
        title: format!("Stack cost per spawn ({} KiB stacks)", r.stack_size / 1024),
        x_desc: "ns per spawn (median)".into(),
        bars: r
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| Bar {
                label: row.kind.to_string(),
                value: row.median_ns,
                series: i,
            })
            .collect(),
    }
}

/// Experiment 2 as a table.
pub fn rcu_free_table(r: &RcuFree) -> String {
    let workers = r.rows.first().map_or(0, |row| row.workers);
    let mut out = format!(
        "Per-CPU cache hit rate, stacks freed synchronously vs after an RCU grace period \
         (spawn-and-exit storm, {workers} pinned workers)\n\n\
         | cache size | stack freed | spawns | cache hits (parked or per-CPU) | depot hits | cold (carved or released) | ns/spawn |\n\
         |---:|---|---:|---:|---:|---:|---:|\n"
    );
    for row in &r.rows {
        let used = row.cache_use();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.0} |",
            row.cache_size,
            row.mode,
            row.spawns,
            pct(used.cache_hit_rate()),
            pct(used.depot_hit_rate()),
            pct(1.0 - used.warm_hit_rate()),
            row.ns_per_spawn
        );
    }
    out
}

/// Experiment 2 as a chart.
pub fn rcu_free_chart(r: &RcuFree) -> BarChart {
    BarChart {
        title: "Per-CPU cache hit rate: synchronous vs RCU-deferred stack free".into(),
        x_desc: "% of spawns served by the thread's parked stack or the local CPU's cache".into(),
        bars: r
            .rows
            .iter()
            .map(|row| Bar {
                label: format!("cache {}, freed {}", row.cache_size, row.mode),
                value: 100.0 * row.cache_hit_rate(),
                series: row.mode as usize,
            })
            .collect(),
    }
}

/// Experiment 3 as a table.
pub fn memory_table(r: &Memory) -> String {
    let mut out = format!(
        "Resident memory per task ({} tasks on 128 KiB stacks; mean depth used {:.1} KiB; \
         VmRSS + VmPTE growth / tasks)\n\n\
         | phase | VmRSS KiB | VmPTE KiB | KiB per task |\n|---|---:|---:|---:|\n",
        r.tasks,
        r.mean_depth as f64 / 1024.0
    );
    for row in &r.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} |",
            row.phase, row.rss_kib, row.pte_kib, row.kib_per_task
        );
    }
    let idle = r.row(Phase::IdleAfterTrim);
    let _ = writeln!(
        out,
        "\nidle: {} KiB resident, mostly the depot's {} warm stacks, the same for any number of \
         tasks (its per-task figure shrinks as --tasks grows), and {} KiB of page tables",
        idle.rss_kib, r.pool_stats.in_depot, idle.pte_kib
    );
    let _ = writeln!(
        out,
        "\nfinal trim released {} KiB (the pool stats below count the pages of every trim)",
        r.trimmed_bytes / 1024
    );
    out
}

/// Experiment 3 as a chart.
pub fn memory_chart(r: &Memory) -> BarChart {
    BarChart {
        title: format!(
            "Resident memory per task ({} tasks, 128 KiB stacks)",
            r.tasks
        ),
        x_desc: "KiB per task (VmRSS + VmPTE)".into(),
        bars: r
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| Bar {
                label: row.phase.to_string(),
                value: row.kib_per_task.max(0.0),
                series: i,
            })
            .collect(),
    }
}

/// Experiment 4 as a table.
pub fn balance_table(r: &Balance) -> String {
    let mut out = String::from(
        "Cache balance when tasks exit on another CPU (2 pinned workers, bursts of 8 tasks)\n\n\
         | tasks | CPUs | spawns | cache hits | depot hits | depot transfers / 1k spawns | carved | free at end: cached / depot / released | ns/spawn |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for row in &r.rows {
        let s = &row.stats;
        let tasks = match row.exit {
            // Only one CPU allowed: both workers share it.
            Exit::Remote if row.cpus.0 == row.cpus.1 => {
                "exit on the other worker, same CPU (only one allowed)".to_string()
            }
            exit => exit.to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {},{} | {} | {} | {} | {:.1} | {} | {} / {} / {} | {:.0} |",
            tasks,
            row.cpus.0,
            row.cpus.1,
            row.spawns,
            pct(row.cache_hit_rate()),
            pct(row.depot_hit_rate()),
            row.depot_transfers_per_1k(),
            s.slots_carved,
            s.cached,
            s.in_depot,
            s.released,
            row.ns_per_spawn
        );
    }
    if r.rows.iter().any(|row| row.cpus.0 == row.cpus.1) {
        out.push_str("\nonly one CPU is allowed: no task exits on another CPU, and the depot traffic \
                      above comes from the stacks in flight between the workers, not from CPU imbalance.\n");
    }
    out
}

/// Experiment 4 as a chart.
pub fn balance_chart(r: &Balance) -> BarChart {
    let mut bars = Vec::new();
    for row in &r.rows {
        bars.push(Bar {
            label: format!("{}: cache hits %", row.exit),
            value: 100.0 * row.cache_hit_rate(),
            series: 0,
        });
        bars.push(Bar {
            label: format!("{}: depot hits %", row.exit),
            value: 100.0 * row.depot_hit_rate(),
            series: 1,
        });
    }
    BarChart {
        title: format!(
            "Cache balance: local vs remote exit (cache size {})",
            r.rows.first().map_or(0, |row| row.cache_size)
        ),
        x_desc: "% of spawns".into(),
        bars,
    }
}
