//! Where log lines go: stderr, in batches.
//!
//! The L7 thread writes an access line per connection; one `write` system call per line (and, behind a channel,
//! one thread wake-up per line) costs it more than formatting the line. Here a logging thread appends its line to
//! a shared buffer and goes on; a writer thread, woken when the buffer stops being empty, writes it out at once if
//! it wrote nothing in the last `FLUSH_EVERY` (a quiet log reads as it happens), else waits out the rest of that
//! time for more lines to gather: at most one write per `FLUSH_EVERY`. Nothing is dropped: a logger that finds
//! `MAX_PENDING` bytes waiting (stderr is slow or blocked) writes them itself. What is pending is written before a
//! panic message and when the guard is dropped at the end of the program.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The writer thread's shortest interval between writes.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting beyond which loggers write themselves.
const MAX_PENDING: usize = 4 << 20;

struct Shared {
    state: Mutex<Pending>,
    wake: Condvar,
}

struct Pending {
    bytes: Vec<u8>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A logger that panicked mid-append leaves at worst a partial line: keep logging.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what is pending now, on the calling thread.
    fn write_pending(&self) {
        let mut pending = self.lock();
        let _ = std::io::stderr().write_all(&pending.bytes);
        pending.bytes.clear();
    }
}

/// The `MakeWriter` given to the subscriber.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Ends the writer thread when dropped, after it wrote everything pending.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The writer, and the guard to keep until the program ends. Also makes a panic write pending lines first, so
/// that they come before its message.
pub fn batched_stderr() -> (BatchedStderr, FlushGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(Pending { bytes: Vec::with_capacity(64 << 10), stop: false }),
        wake: Condvar::new(),
    });
    let for_thread = shared.clone();
    let thread =
        std::thread::Builder::new().name("egressd-log".into()).spawn(move || write_batches(&for_thread));
    let for_panic = shared.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for_panic.write_pending();
        previous(info);
    }));
    let writer = BatchedStderr { shared: shared.clone() };
    // Without the thread (it could not be started), every line is written at once.
    let thread = thread.ok();
    if thread.is_none() {
        shared.lock().stop = true;
    }
    (writer, FlushGuard { shared, thread })
}

fn write_batches(shared: &Shared) {
    let mut batch = Vec::with_capacity(64 << 10);
    let mut last_write: Option<std::time::Instant> = None;
    loop {
        {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.stop {
                pending = shared.wake.wait(pending).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            let since_last = last_write.map_or(FLUSH_EVERY, |t| t.elapsed());
            if !pending.stop && since_last < FLUSH_EVERY {
                // Lines are coming fast: let more gather (a stop cuts the wait short).
                pending = shared
                    .wake
                    .wait_timeout_while(pending, FLUSH_EVERY - since_last, |p| !p.stop)
                    .map_or_else(|e| e.into_inner().0, |(p, _)| p);
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            if pending.stop && batch.is_empty() {
                return;
            }
        }
        let _ = std::io::stderr().write_all(&batch);
        batch.clear();
        last_write = Some(std::time::Instant::now());
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink { shared: &self.shared }
    }
}

/// One logger's access to the buffer: the subscriber writes each formatted event with one `write_all`.
pub struct LineSink<'a> {
    shared: &'a Shared,
}

impl Write for LineSink<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.stop {
            // The writer thread is gone (or never started): straight out, in order after what it wrote.
            drop(pending);
            return std::io::stderr().write(line);
        }
        if pending.bytes.len() + line.len() > MAX_PENDING {
            std::io::stderr().write_all(&pending.bytes)?;
            pending.bytes.clear();
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.write_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(writer: &BatchedStderr) -> Vec<u8> {
        writer.shared.lock().bytes.clone()
    }

    #[test]
    fn lines_wait_for_the_batch_and_the_guard_writes_them_out() {
        let (writer, guard) = batched_stderr();
        writer.make_writer().write_all(b"first line\n").unwrap();
        writer.make_writer().write_all(b"second line\n").unwrap();
        // Written by the writer thread: the buffer empties without anyone flushing.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pending(&writer).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the batch was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.make_writer().write_all(b"last line\n").unwrap();
        drop(guard);
        assert!(pending(&writer).is_empty(), "the guard wrote the rest");
        // After the guard, lines go straight out instead of waiting for a thread that is gone.
        writer.make_writer().write_all(b"after the end\n").unwrap();
        assert!(pending(&writer).is_empty());
    }
}
