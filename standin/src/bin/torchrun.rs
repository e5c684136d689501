//! `torchrun` as the Cosmos Transfer container runs it, played by the stand-in.

fn main() {
    std::process::exit(cosmos_standin::run(std::env::args_os().collect()));
}
