//! `cosmos-job-supervise`: the process runtime's job supervisor on its own,
//! for this crate's tests (which have no `cosmos` binary). Deployed agents
//! run the same code as `cosmos job-supervise`.

fn main() {
    std::process::exit(cosmos_agent::supervise::main(std::env::args_os().skip(1)));
}
