//! Calendar-month windows (UTC): months since January 1970 and back.

use time::{Date, Month, OffsetDateTime};

/// Months between January 1970 and the month holding `now_ms`.
pub(super) fn month_of(now_ms: u64) -> u64 {
    let secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    // Out of `time`'s range (after year 9999): the last representable month.
    let date = OffsetDateTime::from_unix_timestamp(secs)
        .map(OffsetDateTime::date)
        .unwrap_or(Date::MAX);
    let years = u64::try_from(date.year() - 1970).unwrap_or(0);
    years * 12 + u64::from(u8::from(date.month()) - 1)
}

/// Unix milliseconds at 00:00 UTC on the first day of month `index`.
pub(super) fn month_start(index: u64) -> u64 {
    let year = i32::try_from(1970 + index / 12).unwrap_or(i32::MAX);
    let month =
        Month::try_from(u8::try_from(index % 12 + 1).unwrap_or(1)).unwrap_or(Month::January);
    match Date::from_calendar_date(year, month, 1) {
        Ok(d) => {
            let secs = d.midnight().assume_utc().unix_timestamp();
            u64::try_from(secs).unwrap_or(0).saturating_mul(1000)
        }
        // Past year 9999: far enough to never end.
        Err(_) => u64::MAX / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Unit;

    /// 2024-02-29T12:00:00Z.
    const LEAP_DAY_NOON: u64 = 1_709_208_000_000;
    /// 2024-03-01T00:00:00Z.
    const MARCH_2024: u64 = 1_709_251_200_000;

    #[test]
    fn months_follow_the_utc_calendar() {
        assert_eq!(month_of(0), 0);
        assert_eq!(month_of(LEAP_DAY_NOON), 54 * 12 + 1);
        assert_eq!(month_of(MARCH_2024 - 1), 54 * 12 + 1);
        assert_eq!(month_of(MARCH_2024), 54 * 12 + 2);
        assert_eq!(month_start(54 * 12 + 2), MARCH_2024);
        for m in [0, 1, 11, 12, 54 * 12 + 1, 100 * 12 + 11] {
            assert_eq!(month_of(month_start(m)), m);
            assert_eq!(month_of(month_start(m + 1) - 1), m);
        }
        // February 2024 has 29 days.
        let feb = Unit::CalendarMonth.window_of(LEAP_DAY_NOON);
        assert_eq!(
            Unit::CalendarMonth.window_end(feb) - Unit::CalendarMonth.window_start(feb),
            29 * 86_400_000
        );
        // The reset is the time to March 1st, not a 30-day step.
        assert_eq!(
            Unit::CalendarMonth.reset_after(LEAP_DAY_NOON).as_millis(),
            u128::from(MARCH_2024 - LEAP_DAY_NOON)
        );
        assert_eq!(
            Unit::Month.reset_after(61_000),
            std::time::Duration::from_millis(30 * 86_400_000 - 61_000)
        );
    }
}
