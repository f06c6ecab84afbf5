//! Diagnostics on stderr that a fork cannot leave hanging.

use std::fmt::{self, Write as _};

/// Longest line [`warn`] writes, newline included; longer messages are cut
/// and end with `...`.
pub const WARN_MAX: usize = 1024;

/// Writes `message` and a newline to stderr (file descriptor 2), ignoring
/// failure: the diagnostics of the vmtask crates.
///
/// Not through `std::io::stderr()`: its lock is process-wide, and a
/// `fork` while another thread holds it (writing to a slow or full pipe,
/// say) copies it held into the child, whose next write through std then
/// waits for ever. Nor `eprintln!`, which also panics when stderr is
/// closed. The line is formatted on the stack (no allocation by `warn`
/// itself) and written with one `write(2)` where the kernel takes it
/// whole, so lines from several threads do not interleave (a pipe takes
/// up to 4 KiB whole).
///
/// ```
/// vmtask_percpu::warn(format_args!("example: {} of {} done", 3, 4));
/// ```
pub fn warn(message: fmt::Arguments<'_>) {
    write_all(Line::format(message).finish());
}

/// A line being formatted: up to `WARN_MAX - 4` bytes of message (room
/// for `...` and the newline), cut at a character boundary.
struct Line {
    buf: [u8; WARN_MAX],
    len: usize,
    cut: bool,
}

impl Line {
    fn format(message: fmt::Arguments<'_>) -> Line {
        let mut line = Line {
            buf: [0; WARN_MAX],
            len: 0,
            cut: false,
        };
        // `Line` never fails; a `Display` impl that does leaves what it
        // wrote.
        let _ = line.write_fmt(message);
        line
    }

    /// The line's bytes, newline included, `...` ending a cut one.
    fn finish(&mut self) -> &[u8] {
        if self.cut {
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
        self.buf[self.len] = b'\n';
        &self.buf[..self.len + 1]
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        let room = WARN_MAX - 4 - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        self.cut = take < s.len();
        Ok(())
    }
}

/// `write(2)` on file descriptor 2 until all is written or it fails.
fn write_all(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a live buffer of `bytes.len()` bytes.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = &bytes[n as usize..];
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_message_is_written_whole() {
        assert_eq!(
            Line::format(format_args!("a {} c", "b")).finish(),
            b"a b c\n"
        );
    }

    #[test]
    fn a_long_message_is_cut_with_an_ellipsis() {
        let long = "x".repeat(3 * WARN_MAX);
        let mut line = Line::format(format_args!("{long}"));
        let out = line.finish();
        assert_eq!(out.len(), WARN_MAX);
        assert!(out.ends_with(b"x...\n"));
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // Three-byte characters, after one byte that shifts them off the
        // cut.
        let long = format!("a{}", "€".repeat(WARN_MAX));
        let mut line = Line::format(format_args!("{long}"));
        let out = std::str::from_utf8(line.finish()).expect("valid UTF-8");
        assert!(out.ends_with("€...\n"), "{out:?}");
        assert!(out.len() <= WARN_MAX);
    }

    /// `warn` writes while another thread holds std's stderr lock, as a
    /// fork child must when the fork copied that lock held (review
    /// finding: a drain's warning through std hung such a child).
    #[test]
    fn warn_does_not_wait_for_stds_stderr_lock() {
        let held = std::io::stderr().lock();
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            warn(format_args!(
                "vmtask_percpu test: written while std's stderr is locked"
            ));
            let _ = done.send(());
        });
        let written = wait.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        assert!(written.is_ok(), "warn waited for std's stderr lock");
    }
}
