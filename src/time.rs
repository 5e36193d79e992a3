//! Times: RFC 3339 (UTC, `Z`) both ways without a date crate, for log lines and the cleanup
//! records; and the deadline a caller gives a request, which the Kubernetes calls made for it keep.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When the caller stops waiting. The gRPC core tells a server whether a call's deadline has
/// passed, not when it will pass, so a deadline is a probe, an instant, or both; none means
/// background work that nobody waits for.
#[derive(Clone, Default)]
pub struct Deadline {
    at: Option<Instant>,
    probe: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Deadline {
    pub fn none() -> Deadline {
        Deadline::default()
    }

    pub fn at(at: Instant) -> Deadline {
        Deadline {
            at: Some(at),
            probe: None,
        }
    }

    /// A deadline known only by asking whether it has passed.
    pub fn probe(passed: impl Fn() -> bool + Send + Sync + 'static) -> Deadline {
        Deadline {
            at: None,
            probe: Some(Arc::new(passed)),
        }
    }

    pub fn passed(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at) || self.probe.as_ref().is_some_and(|p| p())
    }

    /// Time left, where the instant is known.
    pub fn remaining(&self) -> Option<Duration> {
        self.at.map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Sleeps `d`, or less when the deadline passes first; false when it did.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.passed() {
                return false;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            // Short slices: a probe can only be asked, not waited on.
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

impl std::fmt::Debug for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("remaining", &self.remaining())
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn format(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// RFC 3339 in UTC (`Z`), with or without a fraction (read to the millisecond), back to a time.
pub fn parse(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || !s.ends_with('Z')
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, sec) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    let millis = if b[19] == b'.' {
        s[20..s.len() - 1]
            .get(..3.min(s.len() - 21))
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
}

/// Milliseconds since the epoch: the compact form the cleanup index and node objects carry.
pub fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's public-domain algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The inverse of `civil_from_days`, after the same algorithm.
fn days_from_civil(y: i64, mo: i64, d: i64) -> i64 {
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_cut_sleeps_short() {
        assert!(!Deadline::none().passed());
        assert!(Deadline::none().sleep(Duration::from_millis(1)));
        let soon = Deadline::at(Instant::now() + Duration::from_millis(30));
        assert!(soon.remaining().unwrap() <= Duration::from_millis(30));
        let started = Instant::now();
        assert!(!soon.sleep(Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(soon.passed() && soon.remaining() == Some(Duration::ZERO));
        assert!(Deadline::probe(|| true).passed());
        assert_eq!(Deadline::probe(|| false).remaining(), None);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format(UNIX_EPOCH + Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            format(UNIX_EPOCH + Duration::from_secs(1_795_564_799)),
            "2026-11-24T23:59:59.000Z"
        );
    }

    #[test]
    fn round_trips_and_refuses_other_text() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_564_799_123);
        assert_eq!(parse(&format(t)), Some(t));
        assert_eq!(from_millis(to_millis(t)), t);
        assert_eq!(
            parse("2000-02-29T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(951_782_400))
        );
        for bad in ["", "2000-02-29", "2000-02-29T00:00:00", "x000-02-29T00:00:00Z"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
