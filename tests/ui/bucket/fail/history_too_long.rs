use natty_runtime::kv_bucket;

#[kv_bucket(name = "config", history = 65)]
struct Config;

fn main() {}
