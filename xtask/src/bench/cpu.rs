//! CPU time from /proc: the whole machine's busy time over a run, and a process's own.

/// Busy and total jiffies of the whole machine (/proc/stat's `cpu` line, all CPUs summed),
/// and how many CPUs that line sums.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    busy: u64,
    total: u64,
    cpus: usize,
}

impl Machine {
    pub fn now() -> Option<Machine> {
        parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Busy jiffies since `earlier`.
    pub fn busy_since(&self, earlier: &Machine) -> u64 {
        self.busy.saturating_sub(earlier.busy)
    }

    /// How many CPUs were busy on average since `earlier` (the machine's CPU count when
    /// every one was).
    pub fn busy_cpus_since(&self, earlier: &Machine) -> Option<f64> {
        self.cpus_since(earlier, self.busy_since(earlier))
    }

    /// `jiffies` of CPU time (a process's, say) spent since `earlier`, as a number of CPUs
    /// busy on average over that time.
    pub fn cpus_since(&self, earlier: &Machine, jiffies: u64) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)?;
        Some(jiffies as f64 / total as f64 * self.cpus as f64)
    }
}

fn parse_stat(stat: &str) -> Option<Machine> {
    let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let cpus = stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    Some(Machine { busy: total - idle, total, cpus: cpus.max(1) })
}

/// utime + stime of a process (all its threads), in jiffies.
pub fn process_jiffies(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// µs per jiffy (USER_HZ).
pub fn jiffy_us() -> f64 {
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { 1e6 / hz as f64 } else { 1e4 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_cpus_count_idle_and_iowait_as_idle() {
        let a = parse_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\n").unwrap();
        // 200 more jiffies over both CPUs, 150 of them busy (user, system, softirq).
        let b = parse_stat("cpu  200 0 140 740 110 0 10 0 0 0\ncpu0 100 0 70 370 55 0 5 0 0 0\ncpu1 100 0 70 370 55 0 5 0 0 0\n").unwrap();
        assert_eq!(b.busy_since(&a), 150);
        assert_eq!(b.busy_cpus_since(&a), Some(1.5));
        assert_eq!(b.cpus_since(&a, 50), Some(0.5), "a process's 50 of the 100 jiffies each CPU had");
        assert_eq!(a.busy_cpus_since(&a), None, "no time passed");
    }
}
