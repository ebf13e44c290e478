//! Time-window floors: "00:00-08:00 at least 1, otherwise at least 5",
//! read in the pool's time zone so that a window follows local time across
//! daylight-saving changes.

use infermesh_proto::v1::{DayOfWeek, Pool, ReplicaFloor};
use jiff::Timestamp;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;

/// Why a floor window's time or a pool's time zone is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FloorError {
    /// Not an "HH:MM" time of day.
    #[error("{text:?} is not a time of day \"HH:MM\" (00:00 to 23:59)")]
    NotATime {
        /// The text given.
        text: String,
    },
    /// Not a time zone of the IANA database.
    #[error("{name:?} is not an IANA time zone name")]
    UnknownTimeZone {
        /// The name given.
        name: String,
    },
}

/// Minutes after midnight of an "HH:MM" time, or why it is not one.
pub fn parse_time(text: &str) -> Result<u16, FloorError> {
    let bad = || FloorError::NotATime {
        text: text.to_string(),
    };
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// The pool's time zone; empty means UTC.
pub fn time_zone(name: &str) -> Result<TimeZone, FloorError> {
    if name.is_empty() {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| FloorError::UnknownTimeZone {
        name: name.to_string(),
    })
}

fn iso(day: Weekday) -> i32 {
    i32::from(day.to_monday_one_offset())
}

/// Whether `window` is open at `minute` of a day that is `today`.
fn open(window: &ReplicaFloor, today: Weekday, minute: u16) -> bool {
    let (Ok(start), Ok(end)) = (parse_time(&window.start), parse_time(&window.end)) else {
        return false;
    };
    let on = |day: Weekday| window.days.is_empty() || window.days.contains(&iso(day));
    if start < end {
        on(today) && (start..end).contains(&minute)
    } else if start > end {
        // Runs past midnight: opened today, or opened yesterday and still open.
        (on(today) && minute >= start) || (on(today.previous()) && minute < end)
    } else {
        on(today)
    }
}

/// The fewest replicas at `now`, with the window that sets it (`None`:
/// the pool's own min_replicas).
pub fn floor_at(pool: &Pool, now: Timestamp) -> (u32, Option<&ReplicaFloor>) {
    let zone = time_zone(&pool.time_zone).unwrap_or(TimeZone::UTC);
    let local = now.to_zoned_datetime(zone);
    let minute = local.hour() as u16 * 60 + local.minute() as u16;
    let today = local.weekday();
    pool.floors
        .iter()
        .filter(|w| open(w, today, minute))
        .max_by_key(|w| w.min_replicas)
        .map_or((pool.min_replicas, None), |w| (w.min_replicas, Some(w)))
}

/// "00:00-08:00 Europe/Paris" for reasons and logs.
pub fn describe(pool: &Pool, window: &ReplicaFloor) -> String {
    let zone = if pool.time_zone.is_empty() {
        "UTC"
    } else {
        &pool.time_zone
    };
    let days = if window.days.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = window
            .days
            .iter()
            .map(|d| match DayOfWeek::try_from(*d) {
                Ok(DayOfWeek::Monday) => "Mon",
                Ok(DayOfWeek::Tuesday) => "Tue",
                Ok(DayOfWeek::Wednesday) => "Wed",
                Ok(DayOfWeek::Thursday) => "Thu",
                Ok(DayOfWeek::Friday) => "Fri",
                Ok(DayOfWeek::Saturday) => "Sat",
                Ok(DayOfWeek::Sunday) => "Sun",
                _ => "?",
            })
            .collect();
        format!(" {}", names.join(","))
    };
    format!("{}-{}{days} {zone}", window.start, window.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, end: &str, days: &[DayOfWeek], min: u32) -> ReplicaFloor {
        ReplicaFloor {
            start: start.into(),
            end: end.into(),
            days: days.iter().map(|d| *d as i32).collect(),
            min_replicas: min,
        }
    }

    fn pool(zone: &str, min: u32, floors: Vec<ReplicaFloor>) -> Pool {
        Pool {
            name: "p".into(),
            min_replicas: min,
            max_replicas: 10,
            time_zone: zone.into(),
            floors,
            ..Default::default()
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn times_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_time("00:00"), Ok(0));
        assert_eq!(parse_time("08:30"), Ok(510));
        assert_eq!(parse_time("23:59"), Ok(1439));
        for bad in ["24:00", "8:00", "08:60", "0800", "", "ab:cd", "08:00:00"] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_seed_example_night_floor_1_day_floor_5() {
        // Outside the window the pool's own min (5); 00:00-08:00 at least 1.
        let p = pool("Europe/Paris", 5, vec![window("00:00", "08:00", &[], 1)]);
        // 2026-01-15 is a Thursday; Paris is UTC+1 in winter.
        assert_eq!(floor_at(&p, at("2026-01-15T06:59:00Z")).0, 1); // 07:59 local
        assert_eq!(floor_at(&p, at("2026-01-15T07:00:00Z")).0, 5); // 08:00 local
        assert_eq!(floor_at(&p, at("2026-01-14T22:59:00Z")).0, 5); // 23:59 local
        assert_eq!(floor_at(&p, at("2026-01-14T23:00:00Z")).0, 1); // 00:00 local
        // Summer time (UTC+2): the window follows local time.
        assert_eq!(floor_at(&p, at("2026-07-15T05:59:00Z")).0, 1); // 07:59 local
        assert_eq!(floor_at(&p, at("2026-07-15T06:00:00Z")).0, 5); // 08:00 local
        let (_, open) = floor_at(&p, at("2026-01-15T01:00:00Z"));
        assert_eq!(describe(&p, open.unwrap()), "00:00-08:00 Europe/Paris");
    }

    #[test]
    fn windows_past_midnight_belong_to_the_day_they_open() {
        // Fridays 22:00 to 06:00 next morning: at least 3.
        let p = pool(
            "",
            1,
            vec![window("22:00", "06:00", &[DayOfWeek::Friday], 3)],
        );
        // 2026-01-16 is a Friday.
        assert_eq!(floor_at(&p, at("2026-01-16T21:59:00Z")).0, 1);
        assert_eq!(floor_at(&p, at("2026-01-16T22:00:00Z")).0, 3);
        assert_eq!(floor_at(&p, at("2026-01-17T05:59:00Z")).0, 3); // Saturday morning
        assert_eq!(floor_at(&p, at("2026-01-17T06:00:00Z")).0, 1);
        // Thursday night is not a Friday window.
        assert_eq!(floor_at(&p, at("2026-01-15T23:00:00Z")).0, 1);
        assert_eq!(floor_at(&p, at("2026-01-16T02:00:00Z")).0, 1);
    }

    #[test]
    fn the_highest_open_window_wins_and_whole_day_windows_work() {
        let p = pool(
            "America/New_York",
            2,
            vec![
                window("09:00", "17:00", &[], 6),
                window(
                    "00:00",
                    "00:00",
                    &[DayOfWeek::Saturday, DayOfWeek::Sunday],
                    0,
                ),
                window("12:00", "13:00", &[], 8),
            ],
        );
        // 2026-01-17 is a Saturday; New York is UTC-5 in winter.
        assert_eq!(floor_at(&p, at("2026-01-17T15:00:00Z")).0, 6); // Sat 10:00: 6 beats 0
        assert_eq!(floor_at(&p, at("2026-01-17T17:30:00Z")).0, 8); // Sat 12:30
        assert_eq!(floor_at(&p, at("2026-01-17T23:00:00Z")).0, 0); // Sat 18:00
        assert_eq!(floor_at(&p, at("2026-01-19T23:00:00Z")).0, 2); // Mon 18:00
    }

    #[test]
    fn unknown_zones_are_refused() {
        assert!(time_zone("Mars/Olympus").is_err());
        assert!(time_zone("Europe/Paris").is_ok());
        assert!(time_zone("").is_ok());
    }
}
