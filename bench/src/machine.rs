//! The machine's CPU time, for figures that say how much of the two cores a run took: every
//! process counts (the broker's JVM, the nodes, this harness), as they share the cores.

/// Seconds of CPU the whole machine has spent busy since boot (all cores: user, nice, system,
/// irq, softirq and steal time from the first line of `/proc/stat`).
pub fn busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("/proc/stat does not start with the cpu line"))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(fields.len() >= 8, "short cpu line in /proc/stat: {line}");
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / per_second)
}

/// Runs `f`, returning its result and the machine's busy CPU seconds while it ran.
pub fn busy_during<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let before = busy_seconds()?;
    let value = f()?;
    Ok((value, busy_seconds()? - before))
}
