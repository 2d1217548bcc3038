//! The command line every binary built on [`crate::run`] answers: `--list`, `--check`,
//! `--asyncapi`, `--dead-letters`, `--pause`, `--resume`, `--reset-consumer` and `--help`.
//! With no argument, the service runs.

use std::ffi::OsString;
use std::fmt::Write as _;

use crate::config::Config;
use crate::config::Provision;
use crate::consumer::{Consumer, ConsumerDef};
use crate::error::{Error, Result};
use crate::registry::Declarations;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Run,
    Help,
    List,
    Check,
    AsyncApi,
    /// `--dead-letters list|replay|delete [filters]`.
    DeadLetters(DeadLetterAction, crate::dead_letters::Filter, bool),
    /// `--pause`, `--resume` and `--reset-consumer` of a durable consumer.
    Consumer(ConsumerAction),
}

/// What `--pause`, `--resume` or `--reset-consumer` does to which durable consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConsumerAction {
    durable: String,
    stream: Option<String>,
    act: Act,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    /// Paused for this long.
    Pause(std::time::Duration),
    Resume,
    Reset(crate::operate::Position),
}

/// What `--dead-letters` does with the dead letters its filters select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterAction {
    List,
    Replay,
    Delete,
}

impl Command {
    /// Reads the arguments after the program's name.
    pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command> {
        let args: Vec<OsString> = args.into_iter().collect();
        let Some(first) = args.first() else {
            return Ok(Command::Run);
        };
        let command = match first.to_str() {
            None => {
                return Err(Error::Usage(format!(
                    "unknown argument `{}` (not UTF-8); try --help",
                    first.to_string_lossy()
                )))
            }
            Some("--help" | "-h") => Command::Help,
            Some("--list") => Command::List,
            Some("--check") => Command::Check,
            Some("--asyncapi") => Command::AsyncApi,
            Some("--dead-letters") => return dead_letters_command(&args[1..]),
            Some(verb @ ("--pause" | "--resume" | "--reset-consumer")) => {
                return consumer_command(verb, &args[1..]).map(Command::Consumer)
            }
            Some(_) => {
                return Err(Error::Usage(format!(
                    "unknown argument `{}`; {}",
                    args[0].to_string_lossy(),
                    "try --help"
                )))
            }
        };
        if let Some(extra) = args.get(1) {
            return Err(Error::Usage(format!(
                "unexpected argument `{}` after `{}`; each command stands alone",
                extra.to_string_lossy(),
                args[0].to_string_lossy()
            )));
        }
        Ok(command)
    }
}

/// Reads `--dead-letters`'s arguments: an action, then filters (`--consumer`, `--subject`,
/// `--reason`, `--sequence`) and `--all`.
fn dead_letters_command(args: &[OsString]) -> Result<Command> {
    let usage = |why: String| {
        Err(Error::Usage(format!(
            "{why}; usage: --dead-letters list|replay|delete [--consumer NAME] [--subject PATTERN] \
             [--reason TEXT] [--sequence N] [--all]"
        )))
    };
    let text = |arg: &OsString| arg.to_str().map(str::to_owned);
    let action = match args.first().and_then(text).as_deref() {
        Some("list") => DeadLetterAction::List,
        Some("replay") => DeadLetterAction::Replay,
        Some("delete") => DeadLetterAction::Delete,
        Some(other) => return usage(format!("unknown action `{other}`")),
        None => return usage("an action is missing".into()),
    };
    let mut filter = crate::dead_letters::Filter::default();
    let mut all = false;
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = text(arg) else {
            return usage(format!("`{}` is not UTF-8", arg.to_string_lossy()));
        };
        if flag == "--all" {
            all = true;
            continue;
        }
        let Some(value) = rest.next().and_then(text) else {
            return usage(format!("`{flag}` needs a value"));
        };
        match flag.as_str() {
            "--consumer" => filter.consumer = Some(value),
            "--subject" => filter.subject = Some(value),
            "--reason" => filter.reason = Some(value),
            "--sequence" => match value.parse() {
                Ok(sequence) => filter.sequence = Some(sequence),
                Err(_) => return usage(format!("`--sequence {value}` is not a sequence number")),
            },
            other => return usage(format!("unknown option `{other}`")),
        }
    }
    if action != DeadLetterAction::List && !all && !filter.is_narrowed() {
        return usage(format!(
            "{} takes every dead letter only with `--all`; or select some with a filter",
            if action == DeadLetterAction::Replay {
                "replay"
            } else {
                "delete"
            }
        ));
    }
    Ok(Command::DeadLetters(action, filter, all))
}

/// Reads `--pause DURABLE --for DURATION|--until TIME`, `--resume DURABLE` or
/// `--reset-consumer DURABLE --to SEQUENCE|TIME`, each with an optional `--stream NAME`.
fn consumer_command(verb: &str, args: &[OsString]) -> Result<ConsumerAction> {
    let usage = |why: String| {
        Error::Usage(format!(
            "{why}; usage: --pause DURABLE --for DURATION|--until TIME, --resume DURABLE, or \
             --reset-consumer DURABLE --to SEQUENCE|TIME, each with [--stream NAME]"
        ))
    };
    let text = |arg: &OsString| arg.to_str().map(str::to_owned);
    let Some(durable) = args.first().and_then(text).filter(|d| !d.starts_with("--")) else {
        return Err(usage(format!("{verb} needs the durable consumer's name")));
    };
    let (mut stream, mut pause, mut to) = (None, None, None);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let flag = text(flag).unwrap_or_default();
        let Some(value) = rest.next().and_then(text) else {
            return Err(usage(format!("`{flag}` needs a value")));
        };
        match (verb, flag.as_str()) {
            (_, "--stream") => stream = Some(value),
            ("--pause", "--for") => {
                pause = Some(humantime::parse_duration(&value).map_err(|e| usage(format!("`--for {value}`: {e}")))?);
            }
            ("--pause", "--until") => {
                let until = humantime::parse_rfc3339_weak(&value)
                    .map_err(|_| usage(format!("`--until {value}` is not a time like 2026-12-05T18:00:00Z")))?;
                let left = until
                    .duration_since(std::time::SystemTime::now())
                    .map_err(|_| usage(format!("`--until {value}` has passed")))?;
                pause = Some(left);
            }
            ("--reset-consumer", "--to") => to = Some(crate::operate::Position::parse(&value).map_err(usage)?),
            _ => return Err(usage(format!("unknown option `{flag}` for {verb}"))),
        }
    }
    let act = match verb {
        "--pause" => Act::Pause(pause.ok_or_else(|| usage("--pause needs --for or --until".into()))?),
        "--resume" => Act::Resume,
        _ => Act::Reset(to.ok_or_else(|| usage("--reset-consumer needs --to".into()))?),
    };
    Ok(ConsumerAction { durable, stream, act })
}

/// Runs `--pause`, `--resume` or `--reset-consumer` against the server, printing what it did.
pub(crate) async fn consumer(config: &Config, declared: &Declarations, action: &ConsumerAction) -> Result<()> {
    let (stream, consumers, partitions) = crate::operate::durable(declared, &action.durable, action.stream.as_deref())?;
    let client = connect_to_server(
        config,
        "this command acts on a server's consumer: set NATS_URL to the server",
    )
    .await?;
    let named = format!("consumer `{}` on stream `{stream}`", action.durable);
    match action.act {
        Act::Pause(how_long) => {
            if let Some(until) = crate::operate::pause(&client, &consumers, Some(how_long)).await? {
                println!("paused {named} until {}", humantime::format_rfc3339_seconds(until));
            }
        }
        Act::Resume => {
            crate::operate::pause(&client, &consumers, None).await?;
            println!("resumed {named}");
        }
        Act::Reset(to) => {
            if partitions > 0 {
                return Err(Error::Usage(format!(
                    "{named} is a partitioned group: its partitions read a work-queue stream, which \
                     keeps no message once acked, so there is nothing to reset them to"
                )));
            }
            let (stream, durable) = &consumers[0];
            let next = crate::operate::reset(&client, stream, durable, to).await?;
            println!("reset {named}: it delivers again from stream sequence {next}");
        }
    }
    Ok(())
}

/// Runs `--dead-letters`: lists the selected dead letters, or replays or deletes each,
/// printing one line per dead letter. Fails if any could not be replayed or deleted.
pub(crate) async fn dead_letters(
    config: &Config,
    action: DeadLetterAction,
    filter: &crate::dead_letters::Filter,
) -> Result<()> {
    let client = connect_to_server(
        config,
        "--dead-letters reads a server's dead letters: set NATS_URL to the server",
    )
    .await?;
    let js = client.jetstream();
    let letters = crate::dead_letters::list(js, filter).await?;
    if action == DeadLetterAction::List {
        print!("{}", crate::dead_letters::table(&letters));
        return Ok(());
    }
    let mut failed = 0;
    for letter in &letters {
        let done = match action {
            DeadLetterAction::Replay => crate::dead_letters::replay(js, letter).await,
            _ => crate::dead_letters::delete(js, letter).await,
        };
        let verb = if action == DeadLetterAction::Replay {
            "replayed"
        } else {
            "deleted"
        };
        match done {
            Ok(()) => println!(
                "{verb} {} ({} to {})",
                letter.sequence, letter.consumer, letter.original_subject
            ),
            Err(error) => {
                failed += 1;
                println!("FAILED {}: {}", letter.sequence, crate::error::chain(&error));
            }
        }
    }
    println!(
        "{} dead letter(s) {}, {failed} failed",
        letters.len() - failed,
        if action == DeadLetterAction::Replay {
            "replayed"
        } else {
            "deleted"
        }
    );
    if failed > 0 {
        return Err(Error::Usage(format!(
            "{failed} dead letter(s) could not be handled; see above"
        )));
    }
    Ok(())
}

/// Connects to the server `NATS_URL` names, for a command that reads it; without one, the
/// usage error `unset`. The runtime would otherwise start a development server, and a command
/// run against a server made for the occasion says nothing about production (a `--check`
/// would always pass).
async fn connect_to_server(config: &Config, unset: &str) -> Result<crate::Client> {
    if config.url.is_none() {
        return Err(Error::Usage(unset.to_string()));
    }
    let (client, _dev) = crate::client::connect_config(config, Default::default()).await?;
    Ok(client)
}

/// The `--help` text.
pub(crate) fn help() -> String {
    let name = crate::config::default_name();
    format!(
        "{name}: a NATS JetStream service built with natty

Usage: {name} [COMMAND]

With no command, runs every handler until SIGINT or SIGTERM, then drains.

Commands:
  --list       each handler and declaration: kind, name, stream or subject, durable, source location
  --check      connect and compare what is declared with the server; exits non-zero on any difference
  --asyncapi   print an AsyncAPI 3 document of every channel, with payload schemas
  --dead-letters list|replay|delete [--consumer NAME] [--subject PATTERN] [--reason TEXT]
               [--sequence N] [--all]
               list the dead letters (why, from where, a payload preview), replay them to the
               subject they were first published to, or delete them; replay and delete need a
               filter or --all
  --pause DURABLE --for DURATION|--until TIME [--stream NAME]
               pause a durable consumer (every partition of a group): messages wait in the
               stream; needs nats-server 2.11
  --resume DURABLE [--stream NAME]
               resume it
  --reset-consumer DURABLE --to SEQUENCE|TIME [--stream NAME]
               deliver again from a stream sequence, or from the first message stored at or
               after a time (2026-12-05T18:00:00Z); needs nats-server 2.14
  -h, --help   this text

Settings come from the environment:
  NATS_URL                 server URL(s), comma-separated; unset starts a development server
  NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY, NATS_CREDS, NATS_CA, NATS_CERT, NATS_KEY
  NATTY_PROVISION          create-or-update (default), verify-only or off
  NATTY_HANDLERS           run only these handlers (comma-separated names)
  NATTY_DRAIN_TIMEOUT      how long in-flight handlers may finish on shutdown (default 30s)
  NATTY_METRICS_ADDR       serve the console (/), /metrics, /healthz and /readyz here, e.g. 0.0.0.0:9090
  NATTY_CONSOLE_TOKEN      the console's token: read it from elsewhere, replay, delete, pause
  NATTY_LOG_FORMAT         text (default) or json
  RUST_LOG                 log filter (default info)
  OTEL_EXPORTER_OTLP_ENDPOINT   export spans over OTLP/HTTP (with the `otlp` feature)
"
    )
}

/// What `--list` prints (see [`Runtime::list`](crate::Runtime::list)).
pub(crate) fn list(declared: &Declarations) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let row = |kind: &str, name: &str, what: String, durable: &str, location: String| {
        [kind.into(), name.into(), what, durable.into(), location]
    };
    for stream in &declared.streams {
        let what = format!("subjects {}", stream.subjects().join(", "));
        rows.push(row("stream", stream.name(), what, "", stream.location().to_string()));
    }
    for bucket in &declared.kv_buckets {
        rows.push(row(
            "kv_bucket",
            bucket.name(),
            String::new(),
            "",
            bucket.location().to_string(),
        ));
    }
    for store in &declared.object_stores {
        rows.push(row(
            "object_store",
            store.name(),
            String::new(),
            "",
            store.location().to_string(),
        ));
    }
    for schedule in &declared.schedules {
        let what = format!(
            "stream {}, subject {}, {}",
            schedule.stream(),
            schedule.subject(),
            schedule.spec().header()
        );
        rows.push(row(
            "schedule",
            schedule.name(),
            what,
            "",
            schedule.location().to_string(),
        ));
    }
    for consumer in &declared.consumers {
        let durable = if consumer.ephemeral {
            "(ephemeral)".to_string()
        } else {
            durable_column(consumer)
        };
        rows.push(row(
            "consumer",
            consumer.name,
            consumer_what(consumer),
            &durable,
            consumer.location.to_string(),
        ));
    }
    #[cfg(feature = "capture")]
    for capture in &declared.captures {
        let def = capture.consumer_def();
        rows.push(row(
            "capture",
            capture.name(),
            consumer_what(&def),
            &durable_column(&def),
            def.location.to_string(),
        ));
    }
    for leader in &declared.leaders {
        let what = format!("bucket {}, key {}", leader.bucket, leader.key);
        rows.push(row("leader", leader.name, what, "", leader.location.to_string()));
    }
    for sub in &declared.subscriptions {
        let mut what = format!("subject {}", sub.subject);
        if let Some(queue) = sub.queue {
            let _ = write!(what, ", queue {queue}");
        }
        let kind = match sub.kind {
            crate::subscribe::CoreKind::Subscribe => "subscribe",
            crate::subscribe::CoreKind::Service => "service",
        };
        rows.push(row(kind, sub.name, what, "", sub.location.to_string()));
    }
    for watch in &declared.kv_watches {
        let what = format!("bucket {}, key {}", watch.bucket, watch.key);
        rows.push(row("kv_watch", watch.name, what, "", watch.location.to_string()));
    }
    let header = ["KIND", "NAME", "STREAM / SUBJECT", "DURABLE", "DECLARED AT"].map(String::from);
    let mut widths = [0usize; 5];
    for cells in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What `--check` does (see [`Runtime::check`](crate::Runtime::check)).
pub(crate) async fn check(config: &Config, declared: &Declarations) -> Result<()> {
    let client = connect_to_server(
        config,
        "--check compares the declarations with a server: set NATS_URL to the server to check",
    )
    .await?;
    let js = client.jetstream();
    let mut report = Report::default();
    for stream in &declared.streams {
        let what = format!("stream `{}`", stream.name());
        report.record(what, stream.provision(js, Provision::VerifyOnly).await);
    }
    for bucket in &declared.kv_buckets {
        let what = format!("KV bucket `{}`", bucket.name());
        report.record(what, bucket.provision(&client, Provision::VerifyOnly).await);
    }
    for store in &declared.object_stores {
        let what = format!("object store `{}`", store.name());
        report.record(what, store.provision(&client, Provision::VerifyOnly).await);
    }
    for schedule in &declared.schedules {
        let what = format!("schedule `{}` on stream `{}`", schedule.name(), schedule.stream());
        report.record(what, schedule.provision(&client, Provision::VerifyOnly).await);
    }
    use crate::partition::group::Group;
    /// How to make a durable's group, if it is partitioned.
    type MakeGroup = Box<dyn Fn() -> Result<Group>>;
    let mut durables: Vec<(ConsumerDef, MakeGroup)> = Vec::new();
    for def in &declared.consumers {
        let def = *def;
        durables.push((def, Box::new(move || Group::new(def))));
    }
    #[cfg(feature = "capture")]
    for capture in &declared.captures {
        let capture = *capture;
        durables.push((capture.consumer_def(), Box::new(move || Group::for_capture(capture))));
    }
    for (def, group) in durables.iter().filter(|(def, _)| !def.ephemeral) {
        if def.partitions > 0 {
            // A group: its derived stream, and the consumer of every partition.
            let group = match group() {
                Ok(group) => group,
                Err(error) => {
                    report.record(format!("partitioned consumer `{}`", def.name), Err(error));
                    continue;
                }
            };
            let what = format!("stream `{}` of partitioned consumer `{}`", group.derived(), def.name);
            report.record(what, group.provision(client.jetstream(), Provision::VerifyOnly).await);
            for k in 0..def.partitions {
                let partition = group.consumer(k);
                let what = format!("consumer `{}` on stream `{}`", partition.durable, partition.stream);
                report.record(what, check_consumer(&partition, &client).await);
            }
            continue;
        }
        let what = format!("consumer `{}` on stream `{}`", def.durable, def.stream);
        report.record(what, check_consumer(def, &client).await);
    }
    print!("{}", report.text);
    if report.differences == 0 {
        println!("no drift: the server matches every declaration");
        Ok(())
    } else {
        Err(Error::CheckFailed {
            differences: report.differences,
        })
    }
}

/// A durable's name for `--list`, with its partitions when it is a group.
fn durable_column(def: &ConsumerDef) -> String {
    match def.partitions {
        0 => def.durable.to_string(),
        partitions => format!("{} ({partitions} partitions)", def.durable),
    }
}

/// What a consumer reads, for `--list`.
fn consumer_what(def: &ConsumerDef) -> String {
    match def.subjects {
        [] => format!("stream {}", def.stream),
        subjects => format!("stream {}, subjects {}", def.stream, subjects.join(", ")),
    }
}

/// Compares a durable consumer's declared settings with the server's: binding it in
/// verify-only mode does.
async fn check_consumer(def: &ConsumerDef, client: &crate::Client) -> Result<()> {
    let consumer = Consumer::new(*def, client.clone(), Provision::VerifyOnly, None);
    consumer.bind().await.map(drop)
}

/// The lines `--check` prints, and how many were differences.
#[derive(Default)]
struct Report {
    text: String,
    differences: usize,
}

impl Report {
    fn record(&mut self, what: String, result: Result<()>) {
        match result {
            Ok(()) => {
                let _ = writeln!(self.text, "ok     {what}");
            }
            // A drift names what it is about.
            Err(Error::Drift(drift)) => {
                self.differences += 1;
                let _ = writeln!(self.text, "DRIFT  {drift}");
            }
            Err(error) => {
                self.differences += 1;
                let _ = writeln!(self.text, "DRIFT  {what}: {}", crate::error::chain(&error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_anything_else_is_a_usage_error() {
        let parse = |args: &[&str]| Command::parse(args.iter().map(OsString::from));
        assert!(matches!(parse(&[]), Ok(Command::Run)));
        assert!(matches!(parse(&["--check"]), Ok(Command::Check)));
        assert!(matches!(parse(&["--list", "x"]), Err(Error::Usage(_))));
        assert!(matches!(parse(&["run"]), Err(Error::Usage(_))));
    }

    #[test]
    fn dead_letter_commands_parse_and_take_everything_only_with_all() {
        let parse = |args: &[&str]| Command::parse(args.iter().map(OsString::from));
        let Ok(Command::DeadLetters(DeadLetterAction::List, filter, false)) = parse(&["--dead-letters", "list"]) else {
            panic!("list parses");
        };
        assert!(!filter.is_narrowed());
        let Ok(Command::DeadLetters(DeadLetterAction::Replay, filter, false)) =
            parse(&["--dead-letters", "replay", "--consumer", "billing", "--sequence", "7"])
        else {
            panic!("replay with filters parses");
        };
        assert_eq!(
            (filter.consumer.as_deref(), filter.sequence),
            (Some("billing"), Some(7))
        );
        assert!(matches!(
            parse(&["--dead-letters", "delete", "--all"]),
            Ok(Command::DeadLetters(DeadLetterAction::Delete, _, true))
        ));
        for refused in [
            &["--dead-letters"][..],
            &["--dead-letters", "replay"],
            &["--dead-letters", "delete"],
            &["--dead-letters", "frob"],
            &["--dead-letters", "list", "--sequence", "x"],
            &["--dead-letters", "list", "--subject"],
            &["--dead-letters", "list", "--colour", "red"],
        ] {
            assert!(matches!(parse(refused), Err(Error::Usage(_))), "{refused:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_first_argument_that_is_not_utf8_is_a_usage_error_not_a_run() {
        use std::os::unix::ffi::OsStringExt as _;
        let arg = OsString::from_vec(vec![b'-', b'-', 0xff]);
        assert!(matches!(Command::parse([arg]), Err(Error::Usage(_))));
    }
}
