//! Rebuilds the crate when a migration in `sql/` is added or changed, so that refinery's
//! `embed_migrations!` sees it.

fn main() {
    println!("cargo:rerun-if-changed=sql");
}
