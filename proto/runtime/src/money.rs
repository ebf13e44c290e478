//! Spend: model prices and budgets as the registry writes them (decimal
//! currency amounts as strings, so that nothing is lost to floating
//! point), the exact integers they are kept in, and the calendar periods
//! budgets run over (UTC days and months).
//!
//! Budgets and costs are counted in micro-units (millionths of a currency
//! unit); prices in nano-units per 1,000 tokens, so that a price as low as
//! 0.000000001 per 1k tokens is exact. A request's cost is rounded up to
//! the micro-unit.

use std::fmt;

/// Micro-units in one currency unit.
pub const MICROS: u64 = 1_000_000;
/// The largest budget: a trillion currency units.
const MOST_UNITS: u64 = 1_000_000_000_000;

/// A decimal amount that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not digits with at most one '.'.
    #[error("{0:?} is not a decimal amount such as \"12.50\"")]
    NotDecimal(String),
    /// More decimal places than are kept.
    #[error("{0:?} has more than {1} decimal places")]
    TooPrecise(String, u32),
    /// Beyond the largest amount.
    #[error("{0:?} is more than {MOST_UNITS}")]
    TooLarge(String),
}

/// Parses a non-negative decimal (`"25"`, `"12.50"`, `"0.0005"`) into
/// units of 10^-`places`.
fn parse_scaled(text: &str, places: u32) -> Result<u64, AmountError> {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(AmountError::NotDecimal(text.to_string()));
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > places as usize {
        return Err(AmountError::TooPrecise(text.to_string(), places));
    }
    let whole: u64 = match whole.trim_start_matches('0') {
        "" => 0,
        w if w.len() > 13 => return Err(AmountError::TooLarge(text.to_string())),
        w => w
            .parse()
            .map_err(|_| AmountError::NotDecimal(text.to_string()))?,
    };
    if whole > MOST_UNITS {
        return Err(AmountError::TooLarge(text.to_string()));
    }
    let scale = 10u64.pow(places);
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        let value: u64 = fraction
            .parse()
            .map_err(|_| AmountError::NotDecimal(text.to_string()))?;
        value * 10u64.pow(places - fraction.len() as u32)
    };
    Ok(whole * scale + fraction)
}

/// A budget as the registry holds it, in micro-units; empty is none (0).
pub fn budget_micros(text: &str) -> Result<u64, AmountError> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    parse_scaled(text, 6)
}

/// Micro-units written as a currency amount: at least two decimal places,
/// more where they are not zero (`12.50`, `0.000123`).
pub fn format_micros(micros: u64) -> String {
    let whole = micros / MICROS;
    let fraction = format!("{:06}", micros % MICROS);
    let fraction = fraction.trim_end_matches('0');
    format!("{whole}.{fraction:0<2}")
}

/// What a model's tokens cost, in nano-units per 1,000 tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    /// Per 1,000 prompt tokens.
    pub input_nanos_per_1k: u64,
    /// Per 1,000 completion tokens.
    pub output_nanos_per_1k: u64,
}

impl Price {
    /// A price from the registry's decimal strings (empty is free).
    pub fn parse(input_per_1k: &str, output_per_1k: &str) -> Result<Self, AmountError> {
        let one = |text: &str| {
            if text.trim().is_empty() {
                Ok(0)
            } else {
                parse_scaled(text, 9)
            }
        };
        Ok(Self {
            input_nanos_per_1k: one(input_per_1k)?,
            output_nanos_per_1k: one(output_per_1k)?,
        })
    }

    /// The model's price as the registry holds it; an unset or unreadable
    /// price is free (the registry refuses unreadable ones).
    pub fn of(price: Option<&infermesh_proto::v1::Price>) -> Self {
        price
            .and_then(|p| Self::parse(&p.input_per_1k, &p.output_per_1k).ok())
            .unwrap_or_default()
    }

    /// Whether the model costs nothing.
    pub fn is_free(&self) -> bool {
        self.input_nanos_per_1k == 0 && self.output_nanos_per_1k == 0
    }

    /// The cost of `prompt` and `completion` tokens in micro-units, rounded up.
    pub fn cost_micros(&self, prompt: u64, completion: u64) -> u64 {
        let nanos_x1k = u128::from(prompt) * u128::from(self.input_nanos_per_1k)
            + u128::from(completion) * u128::from(self.output_nanos_per_1k);
        // nano-units x 1000 tokens -> micro-units: divide by 1000 x 1000.
        let micros = nanos_x1k.div_ceil(1_000_000);
        u64::try_from(micros).unwrap_or(u64::MAX)
    }
}

/// A calendar period a budget runs over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    /// From 00:00 UTC to the next.
    Day,
    /// From the first of the month, 00:00 UTC, to the first of the next.
    Month,
}

const DAY_MS: i64 = 24 * 3600 * 1000;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01: (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One period of a budget: which, and when it starts and ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// `2026-12-06` for a day, `2026-12` for a month.
    pub label: String,
    /// Start, in ms since the Unix epoch.
    pub start_unix_ms: i64,
    /// End (the next period's start), in ms since the Unix epoch.
    pub end_unix_ms: i64,
}

impl Period {
    /// The period that holds `unix_ms`.
    pub fn span_at(self, unix_ms: i64) -> Span {
        let days = unix_ms.div_euclid(DAY_MS);
        let (year, month, day) = civil_from_days(days);
        match self {
            Period::Day => Span {
                label: format!("{year:04}-{month:02}-{day:02}"),
                start_unix_ms: days * DAY_MS,
                end_unix_ms: (days + 1) * DAY_MS,
            },
            Period::Month => {
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                Span {
                    label: format!("{year:04}-{month:02}"),
                    start_unix_ms: days_from_civil(year, month, 1) * DAY_MS,
                    end_unix_ms: days_from_civil(next_year, next_month, 1) * DAY_MS,
                }
            }
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Day => "day",
            Period::Month => "month",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly_and_bad_ones_are_named() {
        assert_eq!(budget_micros("25"), Ok(25 * MICROS));
        assert_eq!(budget_micros("12.50"), Ok(12_500_000));
        assert_eq!(budget_micros("0.000001"), Ok(1));
        assert_eq!(budget_micros(".5"), Ok(500_000));
        assert_eq!(budget_micros(""), Ok(0));
        assert_eq!(budget_micros("1.2300000"), Ok(1_230_000));
        for bad in ["-1", "1,5", "1.2.3", "abc", ".", "1e6", "+3"] {
            assert!(
                matches!(budget_micros(bad), Err(AmountError::NotDecimal(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            budget_micros("0.0000001"),
            Err(AmountError::TooPrecise(_, 6))
        ));
        assert!(matches!(
            budget_micros("99999999999999999999"),
            Err(AmountError::TooLarge(_))
        ));
        assert!(matches!(
            budget_micros("1000000000001"),
            Err(AmountError::TooLarge(_))
        ));
    }

    #[test]
    fn amounts_print_with_two_places_or_more() {
        assert_eq!(format_micros(12_500_000), "12.50");
        assert_eq!(format_micros(0), "0.00");
        assert_eq!(format_micros(123), "0.000123");
        assert_eq!(format_micros(7 * MICROS), "7.00");
    }

    #[test]
    fn costs_round_up_to_the_micro_unit() {
        // 0.0005 per 1k prompt tokens, 0.0015 per 1k completion tokens.
        let price = Price::parse("0.0005", "0.0015").unwrap();
        assert_eq!(price.cost_micros(1000, 0), 500);
        assert_eq!(price.cost_micros(1000, 1000), 2000);
        assert_eq!(price.cost_micros(1, 0), 1, "half a micro-unit rounds up");
        assert_eq!(price.cost_micros(0, 0), 0);
        assert!(Price::parse("", "").unwrap().is_free());
        let tiny = Price::parse("0.000000001", "0").unwrap();
        assert_eq!(tiny.input_nanos_per_1k, 1);
        assert_eq!(tiny.cost_micros(1_000_000, 0), 1);
        assert!(Price::parse("0.0000000001", "0").is_err());
        assert_eq!(
            Price::parse("1000", "1000")
                .unwrap()
                .cost_micros(u64::MAX, u64::MAX),
            u64::MAX
        );
    }

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        // 2026-12-06T05:30:00Z
        let t = 1_796_535_000_000;
        let day = Period::Day.span_at(t);
        assert_eq!(day.label, "2026-12-06");
        assert_eq!(day.end_unix_ms - day.start_unix_ms, DAY_MS);
        assert!(day.start_unix_ms <= t && t < day.end_unix_ms);
        let month = Period::Month.span_at(t);
        assert_eq!(month.label, "2026-12");
        assert_eq!(month.end_unix_ms - month.start_unix_ms, 31 * DAY_MS);
        assert_eq!(Period::Month.span_at(month.end_unix_ms).label, "2027-01");
        assert_eq!(
            Period::Month.span_at(month.start_unix_ms - 1).label,
            "2026-11"
        );
        // A leap February.
        let feb = Period::Month.span_at(days_from_civil(2028, 2, 10) * DAY_MS);
        assert_eq!(feb.label, "2028-02");
        assert_eq!(feb.end_unix_ms - feb.start_unix_ms, 29 * DAY_MS);
        assert_eq!(Period::Day.span_at(0).label, "1970-01-01");
        for days in [-1000, 0, 59, 10_000, 20_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
