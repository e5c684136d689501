//! `cosmos-testjob`: the stand-in job program of the runtime contract tests.
//! See the library for what it does and prints.

use cosmos_testjob::{
    Args, EXIT_CANTCREAT, EXIT_USAGE, IGNORING_TERM, STARTED, env_line, exiting_line, step_line, usage_error,
    write_failed_line,
};
use std::io::Write;
use std::time::Duration;

extern "C" fn on_term(_: libc::c_int) {
    // Only async-signal-safe calls here: a plain write(2).
    // SAFETY: writing a static buffer to stderr.
    unsafe { libc::write(2, IGNORING_TERM.as_ptr().cast(), IGNORING_TERM.len()) };
}

fn ignore_term() {
    // SAFETY: installs a handler that only calls write(2); SA_RESTART keeps interrupted calls going.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut()) != 0 {
            eprintln!("testjob: cannot handle SIGTERM: {}", std::io::Error::last_os_error());
            std::process::exit(71);
        }
    }
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout must not stop the job: what it does matters more than what it says.
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

fn err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn sleep_ms(ms: u64) {
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            err(&usage_error(&e));
            std::process::exit(EXIT_USAGE);
        }
    };
    if args.ignore_term {
        ignore_term();
    }
    err(STARTED);
    for var in &args.print_env {
        out(&env_line(var, std::env::var(var).ok().as_deref()));
    }
    for step in 1..=args.steps {
        sleep_ms(args.step_ms);
        out(&step_line(step, args.steps));
    }
    if args.stdout_bytes > 0 {
        let mut stdout = std::io::stdout().lock();
        let block = [b'a'; 8192];
        let mut left = args.stdout_bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            let _ = stdout.write_all(&block[..n]);
            left -= n as u64;
        }
        let _ = stdout.flush();
    }
    sleep_ms(args.sleep_ms);
    for (path, content) in &args.writes {
        let path = std::path::Path::new(path);
        let written = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, content));
        if let Err(e) = written {
            err(&write_failed_line(&path.display().to_string(), &e.to_string()));
            std::process::exit(EXIT_CANTCREAT);
        }
    }
    err(&exiting_line(args.exit_code));
    std::process::exit(args.exit_code);
}
