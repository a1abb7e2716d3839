use clap::Parser;
use std::os::unix::process::CommandExt;
fn main() {
    let config = coordinator::Config::parse();
    let (args, _, _) = config.etcd_args();
    let err = std::process::Command::new("/usr/bin/etcd").args(&args).exec();
    eprintln!("exec etcd: {err}");
    std::process::exit(1);
}
