//! `vmtask`: the seeds' experiments. With no arguments, the tour: every
//! experiment in turn, with a progress bar, a table and an SVG chart each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use vmtask_cli::experiments::{balance, memory, rcu_free, spawn_cost};
use vmtask_cli::{report, Error};

/// Reproduces, on this machine, the measurements behind vmtask: the kernel
/// mailing-list threads on virtually mapped, per-CPU cached, synchronously
/// freed task stacks (the project's "seeds"), with vmtask's stack pool and
/// RCU in place of the kernel's.
///
/// With no subcommand it runs the tour: every experiment in turn, about 15
/// seconds with threads pinned to CPUs, a table and an SVG chart each.
#[derive(Parser, Debug)]
#[command(name = "vmtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Small parameters for a fast run (defaults only: explicit options win).
    #[arg(long, global = true)]
    quick: bool,
    /// Where chart files (SVG) go, relative to the current directory.
    #[arg(long, global = true, default_value = "target/vmtask-charts")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every experiment in turn (the default).
    Tour,
    /// 1. Stack cost per spawn: heap (kmalloc) vs fresh mmap (vmalloc) vs the per-CPU cache.
    SpawnCost(SpawnCostArgs),
    /// 2. Cache hit rate with stacks freed synchronously vs after an RCU grace period.
    RcuFree(RcuFreeArgs),
    /// 3. Resident memory per task: populated vs demand-paged and trimmed stacks.
    Memory(MemoryArgs),
    /// 4. Cache balance when tasks exit on another CPU than the one that spawned them.
    Balance(BalanceArgs),
}

#[derive(Args, Debug, Default)]
struct SpawnCostArgs {
    /// Spawns per repetition and stack kind, at least 1 [default: 20000; --quick 500].
    #[arg(long)]
    count: Option<usize>,
    /// Repetitions per kind, at least 1; the median is reported [default: 15; --quick 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Stack size in KiB, 16 to 65536 (the kernel's THREAD_SIZE is 16).
    #[arg(long, default_value_t = 16)]
    stack_kib: usize,
}

#[derive(Args, Debug, Default)]
struct RcuFreeArgs {
    /// Seconds per storm, at least 0.01 [default: 2; --quick 0.2].
    #[arg(long, allow_negative_numbers = true)]
    secs: Option<f64>,
    /// Per-CPU cache size, 1 to 65536; repeat for several [default: 2 and 16].
    #[arg(long = "cache-size")]
    cache_sizes: Vec<usize>,
    /// Tasks per worker waiting for a grace period before the worker waits;
    /// at least 1.
    #[arg(long, default_value_t = 4096)]
    max_deferred: usize,
}

#[derive(Args, Debug, Default)]
struct MemoryArgs {
    /// Tasks live at once, 1 to 65536 [default: 2000; --quick 200].
    #[arg(long)]
    tasks: Option<usize>,
}

#[derive(Args, Debug, Default)]
struct BalanceArgs {
    /// Seconds per run, at least 0.01 [default: 2; --quick 0.2].
    #[arg(long, allow_negative_numbers = true)]
    secs: Option<f64>,
    /// Per-CPU cache size, 1 to 65536.
    #[arg(long, default_value_t = 16)]
    cache_size: usize,
}

impl SpawnCostArgs {
    fn params(&self, quick: bool) -> Result<spawn_cost::Params, Error> {
        Ok(spawn_cost::Params {
            count: at_least_one(
                "--count",
                self.count.unwrap_or(if quick { 500 } else { 20_000 }),
            )?,
            reps: in_range(
                "--reps",
                at_least_one("--reps", self.reps.unwrap_or(if quick { 3 } else { 15 }))?,
                1..=10_000,
            )?,
            stack_size: in_range("--stack-kib", self.stack_kib, STACK_KIB)? * 1024,
        })
    }
}

/// `--stack-kib`: from the kernel's 16 KiB stacks up to 64 MiB, whose
/// default pool of a million slots still fits in a 64-bit address space
/// (on 32-bit targets, past about 380 KiB, the pool's 8,192 default slots
/// do not fit, and the pool's configuration error says so).
const STACK_KIB: std::ops::RangeInclusive<usize> = 16..=65536;
/// `--tasks`: the populated phase makes 128 KiB resident per task, so
/// 65536 tasks is 8 GiB; more would be refused by the pool (its
/// `max_stacks` is 2^20 on 64-bit targets) or end in the OOM killer, not
/// in a message.
const TASKS: std::ops::RangeInclusive<usize> = 1..=65536;
/// `--cache-size`: `vmtask_stack::Config::cache_size`'s range.
const CACHE_SIZE: std::ops::RangeInclusive<usize> = 1..=65536;

/// `value` of `option`, checked against `range` before anything runs.
fn in_range(
    option: &str,
    value: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, Error> {
    if !range.contains(&value) {
        return Err(Error::Usage(format!(
            "{option} {value} is out of range: must be {} to {}",
            range.start(),
            range.end()
        )));
    }
    Ok(value)
}

/// `value` of `option`, which counts something an experiment needs at least
/// one of: zero would silently measure nothing.
fn at_least_one(option: &str, value: usize) -> Result<usize, Error> {
    if value == 0 {
        return Err(Error::Usage(format!(
            "{option} 0 is out of range: must be at least 1"
        )));
    }
    Ok(value)
}

/// Shortest run the storms accept: below it the workers may be stopped
/// before they spawn anything, and the rates would describe no spawns.
const MIN_SECS: f64 = 0.01;

fn seconds(secs: Option<f64>, quick: bool) -> Result<Duration, Error> {
    let secs = secs.unwrap_or(if quick { 0.2 } else { 2.0 });
    let out_of_range = || {
        // Huge values in scientific notation, not hundreds of digits.
        let shown = if secs.abs() < 1e9 {
            secs.to_string()
        } else {
            format!("{secs:e}")
        };
        Error::Usage(format!(
            "--secs {shown} is out of range: must be from {MIN_SECS} to {:.1e} seconds",
            Duration::MAX.as_secs_f64()
        ))
    };
    // NaN fails the range check; values too long for a Duration fail the
    // conversion.
    if !(MIN_SECS..=f64::INFINITY).contains(&secs) {
        return Err(out_of_range());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| out_of_range())
}

impl RcuFreeArgs {
    fn params(&self, quick: bool) -> Result<rcu_free::Params, Error> {
        Ok(rcu_free::Params {
            duration: seconds(self.secs, quick)?,
            cache_sizes: if self.cache_sizes.is_empty() {
                vec![2, 16]
            } else {
                self.cache_sizes
                    .iter()
                    .map(|&n| in_range("--cache-size", n, CACHE_SIZE))
                    .collect::<Result<_, _>>()?
            },
            max_deferred: at_least_one("--max-deferred", self.max_deferred)?,
        })
    }
}

impl MemoryArgs {
    fn params(&self, quick: bool) -> Result<memory::Params, Error> {
        Ok(memory::Params {
            tasks: in_range(
                "--tasks",
                at_least_one(
                    "--tasks",
                    self.tasks.unwrap_or(if quick { 200 } else { 2000 }),
                )?,
                TASKS,
            )?,
        })
    }
}

impl BalanceArgs {
    fn params(&self, quick: bool) -> Result<balance::Params, Error> {
        Ok(balance::Params {
            duration: seconds(self.secs, quick)?,
            cache_size: in_range("--cache-size", self.cache_size, CACHE_SIZE)?,
        })
    }
}

/// The experiments of one invocation, with their parameters.
#[derive(Default)]
struct Plan {
    spawn_cost: Option<spawn_cost::Params>,
    rcu_free: Option<rcu_free::Params>,
    memory: Option<memory::Params>,
    balance: Option<balance::Params>,
}

impl Command {
    /// The heading of the command's output.
    fn heading(&self) -> &'static str {
        match self {
            Command::Tour => "vmtask tour",
            Command::SpawnCost(_) => "vmtask spawn-cost",
            Command::RcuFree(_) => "vmtask rcu-free",
            Command::Memory(_) => "vmtask memory",
            Command::Balance(_) => "vmtask balance",
        }
    }
}

impl Plan {
    fn new(command: Option<Command>, quick: bool) -> Result<Plan, Error> {
        Ok(match command {
            None | Some(Command::Tour) => Plan {
                spawn_cost: Some(
                    SpawnCostArgs {
                        stack_kib: 16,
                        ..Default::default()
                    }
                    .params(quick)?,
                ),
                rcu_free: Some(
                    RcuFreeArgs {
                        max_deferred: 4096,
                        ..Default::default()
                    }
                    .params(quick)?,
                ),
                memory: Some(MemoryArgs::default().params(quick)?),
                balance: Some(
                    BalanceArgs {
                        cache_size: 16,
                        ..Default::default()
                    }
                    .params(quick)?,
                ),
            },
            Some(Command::SpawnCost(args)) => Plan {
                spawn_cost: Some(args.params(quick)?),
                ..Plan::default()
            },
            Some(Command::RcuFree(args)) => Plan {
                rcu_free: Some(args.params(quick)?),
                ..Plan::default()
            },
            Some(Command::Memory(args)) => Plan {
                memory: Some(args.params(quick)?),
                ..Plan::default()
            },
            Some(Command::Balance(args)) => Plan {
                balance: Some(args.params(quick)?),
                ..Plan::default()
            },
        })
    }

    fn steps(&self) -> u64 {
        self.spawn_cost.as_ref().map_or(0, |p| p.steps())
            + self.rcu_free.as_ref().map_or(0, |p| p.steps())
            + self.memory.as_ref().map_or(0, |p| p.steps())
            + self.balance.as_ref().map_or(0, |p| p.steps())
    }
}

/// Prints through the progress bar, so the two do not garble each other.
struct Out<'a> {
    bar: &'a ProgressBar,
    charts: &'a Path,
}

impl Out<'_> {
    fn print(&self, text: impl AsRef<str>) {
        self.bar.suspend(|| println!("{}", text.as_ref()));
    }

    fn section(&self, number: usize, title: &str, finding: &str) {
        self.print(format!("\n## {number}. {title}\n\nSeed: {finding}\n"));
        self.bar.set_message(title.to_string());
    }

    fn chart(&self, chart: vmtask_cli::chart::BarChart, name: &str) -> Result<(), Error> {
        let path = chart.write_svg(self.charts, name)?;
        self.print(format!("chart: {}", path.display()));
        Ok(())
    }
}

fn run(plan: &Plan, out: &Out<'_>) -> Result<(), Error> {
    let tick = || out.bar.inc(1);
    // One experiment's failure (pinning refused, /proc unreadable) is
    // reported under its section; the others still run.
    let mut failed = None;
    let mut attempt = |result: Result<(), Error>| {
        if let Err(e) = result {
            out.print(format!(
                "vmtask: error: {e}\n(this experiment is skipped; the others run)\n"
            ));
            failed.get_or_insert(e);
        }
    };
    if let Some(params) = &plan.spawn_cost {
        out.section(
            1,
            "Stack cost per spawn",
            "vmalloc'd stacks cost ~1.5 µs more per fork than kmalloc'd ones; a per-CPU cache of 2 stacks turned that into a gain.",
        );
        attempt((|| {
            let r = spawn_cost::run(params, &tick)?;
            out.print(report::spawn_cost_table(&r));
            let ns = |k| r.row(k).median_ns;
            out.print(format!(
            "fresh mapping costs {:+.0} ns per spawn over the heap; the pool's parked stack {:+.0} ns.\n",
            ns(spawn_cost::StackKind::Mmap) - ns(spawn_cost::StackKind::Heap),
            ns(spawn_cost::StackKind::Pool) - ns(spawn_cost::StackKind::Heap),
        ));
            out.print(format!("pool stats:\n{}\n", r.pool_stats));
            out.chart(report::spawn_cost_chart(&r), "1-spawn-cost")
        })());
    }
    if let Some(params) = &plan.rcu_free {
        out.section(
            2,
            "Stack free: synchronous vs after an RCU grace period",
            "\"I implemented a percpu cache, and it's useless\": RCU-delayed frees arrive in batches, the cache is empty, then flooded.",
        );
        attempt((|| {
            let r = rcu_free::run(params, &tick)?;
            out.print(report::rcu_free_table(&r));
            for row in &r.rows {
                out.print(format!(
                    "pool stats, cache {}, freed {}:\n{}\n",
                    row.cache_size, row.mode, row.stats
                ));
            }
            out.chart(report::rcu_free_chart(&r), "2-rcu-free")
        })());
    }
    if let Some(params) = &plan.memory {
        out.section(
            3,
            "Resident memory per task",
            "dynamic stacks: most threads use a few KiB; map only what is used and give the rest back.",
        );
        attempt((|| {
            let r = memory::run(params, &tick)?;
            out.print(report::memory_table(&r));
            out.print(format!(
                "pool stats (demand-paged pool):\n{}\n",
                r.pool_stats
            ));
            out.chart(report::memory_chart(&r), "3-memory")
        })());
    }
    if let Some(params) = &plan.balance {
        out.section(
            4,
            "Cache balance across CPUs",
            "the per-CPU cache gets unbalanced when threads exit on another CPU than the one they started on.",
        );
        attempt((|| {
            let r = balance::run(params, &tick)?;
            out.print(report::balance_table(&r));
            out.print("nothing piled up: no stack live, every free stack in a cache, the depot or the released list, each within its capacity.\n");
            for row in &r.rows {
                out.print(format!("pool stats, {}:\n{}\n", row.exit, row.stats));
            }
            out.chart(report::balance_chart(&r), "4-balance")
        })());
    }
    failed.map_or(Ok(()), Err)
}

fn main() -> ExitCode {
    // `vmtask | head`: end quietly like other tools, not with a panic.
    // SAFETY: no other thread runs yet.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let quick = cli.common.quick;
    let heading = cli.command.as_ref().map_or("vmtask tour", Command::heading);
    let result = Plan::new(cli.command, quick).and_then(|plan| {
        // A chart directory that cannot be written fails now, not after
        // the first experiment has run.
        vmtask_cli::chart::check_dir(&cli.common.out)?;
        let bar = ProgressBar::new(plan.steps());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("the template is valid"),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        let out = Out {
            bar: &bar,
            charts: &cli.common.out,
        };
        let cpus = vmtask_cli::experiments::allowed_cpus();
        // Not StackPool::global(): it panics when a pool cannot be made.
        let guards = vmtask_stack::StackPool::new(vmtask_stack::Config::default())?.guard_mode();
        out.print(format!(
            "# {heading}{}\n\n{} CPUs allowed ({:?}); per-CPU cache mode: {}; stack guards: {}",
            if quick { " (--quick)" } else { "" },
            cpus.len(),
            cpus,
            vmtask_percpu::cache_mode(),
            guards,
        ));
        let start = Instant::now();
        let result = run(&plan, &out);
        bar.finish_and_clear();
        result?;
        println!("\n## RCU stats\n\n{}", vmtask_rcu::stats());
        println!("\ndone in {:.1?}", start.elapsed());
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmtask: error: {e}");
            // As clap does for the arguments it rejects itself.
            if matches!(e, Error::Usage(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
