//! Who is watching which pod: the CLI sessions, their rate limits and dropped counts, and
//! the set of pods whose trace switch the agent's loop must keep on.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

/// Records a session may have queued before the rate limit is the least of its problems.
const QUEUE: usize = 1024;

/// At most `rate` a second, in bursts of up to `rate`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        Self::starting_at(rate, Instant::now())
    }

    fn starting_at(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        TokenBucket { rate, tokens: rate, last: now }
    }

    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Session {
    pod: String,
    tx: mpsc::SyncSender<serde_json::Value>,
    bucket: TokenBucket,
    dropped: Arc<AtomicU64>,
}

/// What a session gets when it opens.
pub struct Opened {
    pub id: u64,
    /// The `TraceHub` generation that includes this session.
    pub generation: u64,
    pub records: mpsc::Receiver<serde_json::Value>,
    /// Records the rate limit (or a full queue) left out, so far.
    pub dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct Inner {
    sessions: BTreeMap<u64, Session>,
    next_id: u64,
    /// Bumped whenever the set of traced pods may have changed.
    generation: u64,
    /// The last generation the agent's loop has written to the kernel.
    applied: u64,
}

/// Shared by the admin endpoint (sessions come and go), the aya-log reader (dispatches
/// records) and the agent's loop (keeps the `PODS` switches in step).
pub struct TraceHub {
    inner: Mutex<Inner>,
    /// Each pod's rule set by netns: a record's listener id is named from it.
    rule_sets: Mutex<BTreeMap<u64, Arc<sidecap_policy::Generation>>>,
    applied: Condvar,
    rate: u32,
}

impl TraceHub {
    pub fn new(rate: u32) -> Self {
        TraceHub { inner: Mutex::default(), rule_sets: Mutex::default(), applied: Condvar::new(), rate: rate.max(1) }
    }

    /// The agent's loop, after each pass.
    pub fn set_rule_sets(&self, sets: BTreeMap<u64, Arc<sidecap_policy::Generation>>) {
        *self.rule_sets.lock().unwrap_or_else(|p| p.into_inner()) = sets;
    }

    /// The name of listener `id` in the rule set of the pod at `netns` (`0.0.0.0_8080`).
    pub fn listener_name(&self, netns: u64, id: u32) -> Option<String> {
        self.rule_sets.lock().unwrap_or_else(|p| p.into_inner()).get(&netns)?.listener_names.get(&id).cloned()
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking holder leaves plain data behind: keep going with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching `pod`: its switch goes on at the loop's next turn.
    pub fn open(&self, pod: &str) -> Opened {
        let (tx, records) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut g = self.lock();
        g.next_id += 1;
        g.generation += 1;
        let id = g.next_id;
        g.sessions
            .insert(id, Session { pod: pod.to_string(), tx, bucket: TokenBucket::new(self.rate), dropped: dropped.clone() });
        Opened { id, generation: g.generation, records, dropped }
    }

    /// Ends a session: the pod's switch goes off at the loop's next turn unless another
    /// session (or the pod's annotation) keeps it on.
    pub fn close(&self, id: u64) {
        let mut g = self.lock();
        if g.sessions.remove(&id).is_some() {
            g.generation += 1;
        }
    }

    /// The pods with a session, and the generation they are as of.
    pub fn traced(&self) -> (u64, BTreeSet<String>) {
        let g = self.lock();
        (g.generation, g.sessions.values().map(|s| s.pod.clone()).collect())
    }

    /// The loop has written the switches of `generation` to the kernel.
    pub fn mark_applied(&self, generation: u64) {
        let mut g = self.lock();
        g.applied = g.applied.max(generation);
        self.applied.notify_all();
    }

    /// Waits (bounded) until the loop has applied `generation`; false on timeout.
    pub fn wait_applied(&self, generation: u64, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self.applied.wait_timeout_while(g, timeout, |g| g.applied < generation).unwrap_or_else(|p| p.into_inner());
        g.applied >= generation
    }

    /// Hands a record of `pod` to every session watching it, within each one's rate.
    pub fn dispatch(&self, pod: &str, record: &serde_json::Value) {
        let mut g = self.lock();
        for s in g.sessions.values_mut().filter(|s| s.pod == pod) {
            if !s.bucket.take() || s.tx.try_send(record.clone()).is_err() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_up_to_the_rate_then_refills_with_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::starting_at(3, t0);
        let passed = (0..10).filter(|_| b.take_at(t0)).count();
        assert_eq!(passed, 3);
        assert!(!b.take_at(t0 + Duration::from_millis(100)));
        assert!(b.take_at(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn sessions_set_the_traced_pods_and_count_what_they_drop() {
        let hub = TraceHub::new(2);
        let a = hub.open("default/a");
        let (g1, pods) = hub.traced();
        assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["default/a"]);
        for i in 0..5 {
            hub.dispatch("default/a", &serde_json::json!({ "n": i }));
            hub.dispatch("default/b", &serde_json::json!({ "n": i }));
        }
        assert_eq!(a.records.try_iter().count(), 2);
        assert_eq!(a.dropped.load(Ordering::Relaxed), 3);
        assert!(!hub.wait_applied(g1, Duration::from_millis(10)));
        hub.mark_applied(g1);
        assert!(hub.wait_applied(g1, Duration::from_millis(10)));
        hub.close(a.id);
        let (g2, pods) = hub.traced();
        assert!(g2 > g1 && pods.is_empty());
    }
}
