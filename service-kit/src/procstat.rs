//! CPU time and memory of running processes, read from `/proc`: what the bench binaries print
//! next to their figures (the registry's and config-svc's scale modes), so that a figure
//! always comes with what it cost, read one way.

use std::io;

/// One reading of a process: resident memory now and at its peak (KiB), and the CPU time it
/// has used so far, user plus system (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// `VmRSS`.
    pub rss_kib: u64,
    /// `VmHWM`, the peak resident size.
    pub hwm_kib: u64,
    /// utime + stime.
    pub cpu_s: f64,
}

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Read `pid`'s usage. A process that is gone is an error that names it.
pub fn usage(pid: u32) -> io::Result<Usage> {
    let named =
        |e: io::Error| io::Error::new(e.kind(), format!("process {pid} (is it running?): {e}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(named)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(named)?;
    Ok(parse(&status, &stat))
}

/// A [`Usage`] from the text of `/proc/PID/status` and `/proc/PID/stat`.
fn parse(status: &str, stat: &str) -> Usage {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    // After it, state is field 3, so utime and stime (fields 14 and 15) are at 11 and 12.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Usage {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_s: (tick(11) + tick(12)) as f64 / USER_HZ,
    }
}

/// The value of a `--pid name=PID` flag.
pub fn parse_named_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("--pid takes name=PID, not {s:?}"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("--pid {s:?}: {pid:?} is not a process id"))?;
    Ok((name.to_owned(), pid))
}

/// Named processes read together.
#[derive(Debug, Clone)]
pub struct Watched {
    procs: Vec<(String, u32)>,
}

impl Watched {
    /// Watch these `(name, pid)`s; every one must be running.
    pub fn new(procs: Vec<(String, u32)>) -> io::Result<Watched> {
        for (name, pid) in &procs {
            usage(*pid)
                .map_err(|e| io::Error::new(e.kind(), format!("--pid {name}={pid}: {e}")))?;
        }
        Ok(Watched { procs })
    }

    /// One reading of each, in order.
    pub fn sample(&self) -> io::Result<Vec<Usage>> {
        self.procs.iter().map(|(_, pid)| usage(*pid)).collect()
    }

    /// "coordinator 812 (peak 840), registry 95 (peak 120)": resident MiB of each.
    pub fn rss(&self, u: &[Usage]) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        self.procs
            .iter()
            .zip(u)
            .map(|((name, _), u)| {
                format!("{name} {:.0} (peak {:.0})", mib(u.rss_kib), mib(u.hwm_kib))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// CPU seconds each used between two readings.
    pub fn cpu(&self, a: &[Usage], b: &[Usage]) -> Vec<(String, f64)> {
        self.procs
            .iter()
            .zip(a.iter().zip(b))
            .map(|((name, _), (a, b))| (name.clone(), b.cpu_s - a.cpu_s))
            .collect()
    }
}

/// "coordinator 12.3, registry 4.1": what [`Watched::cpu`] gave, as a table cell.
pub fn cpu_line(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(n, c)| format!("{n} {c:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them (empty if unreadable).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_and_cpu_even_with_a_command_name_holding_spaces_and_parens() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(
            parse(status, stat),
            Usage {
                rss_kib: 1024,
                hwm_kib: 2048,
                cpu_s: 3.25
            }
        );
    }

    #[test]
    fn this_process_is_read_and_a_missing_one_is_an_error_naming_it() {
        let me = usage(std::process::id()).expect("our own /proc entry");
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib, "{me:?}");
        let gone = usage(u32::MAX).expect_err("no such process");
        assert!(gone.to_string().contains(&u32::MAX.to_string()), "{gone}");
    }

    #[test]
    fn named_pids_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_named_pid("coordinator=12"),
            Ok(("coordinator".into(), 12))
        );
        let no_name = parse_named_pid("12").expect_err("no name");
        assert!(no_name.contains("name=PID"), "{no_name}");
        let no_pid = parse_named_pid("a=b").expect_err("no pid");
        assert!(no_pid.contains("not a process id"), "{no_pid}");
    }

    #[test]
    fn rows_name_each_process() {
        let w = Watched {
            procs: vec![("a".into(), 1), ("b".into(), 2)],
        };
        let u0 = [Usage::default(); 2];
        let u1 = [
            Usage {
                rss_kib: 2048,
                hwm_kib: 4096,
                cpu_s: 1.5,
            },
            Usage {
                rss_kib: 1024,
                hwm_kib: 1024,
                cpu_s: 0.3,
            },
        ];
        assert_eq!(w.rss(&u1), "a 2 (peak 4), b 1 (peak 1)");
        assert_eq!(cpu_line(&w.cpu(&u0, &u1)), "a 1.5, b 0.3");
    }
}
