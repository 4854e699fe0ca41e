//! The admin command language: one line of text → one [`Command`] for the controller.
//!
//! Pure parsing, no I/O: the admin socket server runs it on every line it reads, and `pgshift
//! ctl` runs it before connecting, so a typo is reported locally and never reaches the proxy.
//! Every error says what is wrong and what would be right.

use crate::color::Color;
use crate::controller::{Command, PinKey};

/// The verbs, in the order they are listed in error messages.
pub const VERBS: [&str; 11] = [
    "status", "weight", "rollout", "promote", "cutover", "rollback", "pin", "unpin", "drain",
    "undrain", "reload",
];

/// The `rollout` subcommands.
const ROLLOUT_ACTIONS: [&str; 5] = ["start", "next", "pause", "resume", "evaluate"];

/// Parses one command line (without its `\n`; a trailing `\r` is ignored).
///
/// Words are separated by any run of spaces or tabs; leading and trailing whitespace is ignored.
/// Values (pin values, colors, percents) cannot contain whitespace. `rollback`'s reason is the
/// rest of the line, as written.
pub fn parse_command(line: &str) -> Result<Command, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.contains(['\n', '\r']) {
        return Err("a command is one line: it may not contain a line break".to_string());
    }
    if let Some(control) = line.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(format!(
            "the command contains the control character {control:?}"
        ));
    }
    let line = line.trim();
    let (verb, rest) = match line.split_once(char::is_whitespace) {
        Some((verb, rest)) => (verb, rest.trim_start()),
        None => (line, ""),
    };
    let arguments: Vec<&str> = rest.split_whitespace().collect();
    match verb {
        "" => Err(format!("empty command; {}", list_commands())),
        "status" => no_arguments("status", &arguments).map(|()| Command::Status),
        "weight" => parse_weight(&arguments),
        "rollout" => parse_rollout(&arguments),
        "promote" => parse_promote(&arguments),
        "cutover" => parse_cutover(&arguments),
        "rollback" => Ok(Command::Rollback {
            reason: (!rest.is_empty()).then(|| rest.to_string()),
        }),
        "pin" => parse_pin(&arguments),
        "unpin" => parse_unpin(&arguments),
        "drain" => one_color("drain", &arguments).map(Command::Drain),
        "undrain" => one_color("undrain", &arguments).map(Command::Undrain),
        "reload" => no_arguments("reload", &arguments).map(|()| Command::Reload),
        unknown => Err(format!("unknown command {unknown:?}; {}", list_commands())),
    }
}

/// The command as a line [`parse_command`] reads back as the same command (canonical spacing).
pub fn format_command(command: &Command) -> String {
    match command {
        Command::Weight { basis_points } => {
            let percent = crate::config::format_percent(*basis_points);
            format!("weight {}", percent.trim_end_matches('%'))
        }
        Command::Promote { check_only, force } => {
            let mut text = "promote".to_string();
            if *check_only {
                text.push_str(" --check");
            }
            if *force {
                text.push_str(" --force");
            }
            text
        }
        Command::Rollback {
            reason: Some(reason),
        } => format!("rollback {reason}"),
        Command::Pin { key, value, color } => format!("pin {}={value} {color}", key.as_str()),
        Command::Unpin { key, value } => format!("unpin {}={value}", key.as_str()),
        Command::Drain(color) => format!("drain {color}"),
        Command::Undrain(color) => format!("undrain {color}"),
        other => other.verb().to_string(),
    }
}

fn list_commands() -> String {
    format!("commands: {}", VERBS.join(", "))
}

fn no_arguments(verb: &str, arguments: &[&str]) -> Result<(), String> {
    if arguments.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{verb} takes no arguments, found {}",
            quote_all(arguments)
        ))
    }
}

fn quote_all(words: &[&str]) -> String {
    words
        .iter()
        .map(|word| format!("{word:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_weight(arguments: &[&str]) -> Result<Command, String> {
    match arguments {
        [percent] => {
            percent_to_basis_points(percent).map(|basis_points| Command::Weight { basis_points })
        }
        [] => Err("weight needs a percent, e.g. `weight 12.5`".to_string()),
        [_, extra @ ..] => Err(format!(
            "weight takes one percent, found extra {} (values may not contain whitespace)",
            quote_all(extra)
        )),
    }
}

/// A percent in 0..=100 with at most two decimals (`12`, `12.5`, `12.34`, optionally `12.5%`)
/// as basis points (0..=10000).
pub fn percent_to_basis_points(text: &str) -> Result<u16, String> {
    let number = text.strip_suffix('%').unwrap_or(text);
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (number, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let is_number = all_digits(whole) && fraction.is_none_or(all_digits);
    if !is_number {
        let sign_hint = if number.starts_with('-') {
            " (it cannot be negative)"
        } else {
            ""
        };
        return Err(format!(
            "weight {text:?} is not a percent between 0 and 100{sign_hint}; write e.g. 12.5"
        ));
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > 2 {
        return Err(format!(
            "weight {text} has more than two decimals (write e.g. 12.34)"
        ));
    }
    let out_of_range = || format!("weight {text} is above 100 (a percent between 0 and 100)");
    let whole = whole.trim_start_matches('0');
    if whole.len() > 3 {
        return Err(out_of_range());
    }
    let whole: u32 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| out_of_range())?
    };
    let hundredths: u32 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<u32>().map_err(|_| out_of_range())? * 10,
        _ => fraction.parse().map_err(|_| out_of_range())?,
    };
    let basis_points = whole * 100 + hundredths;
    if basis_points > u32::from(crate::config::FULL_WEIGHT_BP) {
        return Err(out_of_range());
    }
    u16::try_from(basis_points).map_err(|_| out_of_range())
}

fn parse_rollout(arguments: &[&str]) -> Result<Command, String> {
    let expected = ROLLOUT_ACTIONS.join(", ");
    match arguments {
        ["start"] => Ok(Command::RolloutStart),
        ["next"] => Ok(Command::RolloutNext),
        ["pause"] => Ok(Command::RolloutPause),
        ["resume"] => Ok(Command::RolloutResume),
        ["evaluate"] => Ok(Command::RolloutEvaluate),
        [] => Err(format!("rollout needs one of: {expected}")),
        [action] => Err(format!(
            "unknown rollout action {action:?}; expected one of: {expected}"
        )),
        [action, extra @ ..] => Err(format!(
            "rollout {action} takes no further arguments, found {}",
            quote_all(extra)
        )),
    }
}

fn parse_promote(arguments: &[&str]) -> Result<Command, String> {
    let mut check_only = false;
    let mut force = false;
    for argument in arguments {
        let flag = match *argument {
            "--check" => &mut check_only,
            "--force" => &mut force,
            option => {
                return Err(format!(
                    "unknown promote option {option:?}; the options are --check and --force"
                ));
            }
        };
        if *flag {
            return Err(format!(
                "promote takes --check and --force at most once each, found {}",
                quote_all(arguments)
            ));
        }
        *flag = true;
    }
    Ok(Command::Promote { check_only, force })
}

fn parse_cutover(arguments: &[&str]) -> Result<Command, String> {
    match arguments {
        ["abort"] => Ok(Command::CutoverAbort),
        [] => Err("cutover needs an action; the only one is `cutover abort`".to_string()),
        [action] => Err(format!(
            "unknown cutover action {action:?}; the only one is `cutover abort`"
        )),
        [_, extra @ ..] => Err(format!(
            "cutover abort takes no further arguments, found {}",
            quote_all(extra)
        )),
    }
}

fn parse_pin(arguments: &[&str]) -> Result<Command, String> {
    let usage = "pin takes KEY=VALUE COLOR, e.g. `pin database=tenant_42 green`";
    match arguments {
        [pair, color] => {
            let (key, value) = parse_pin_pair(pair)?;
            let color = parse_color(color)?;
            Ok(Command::Pin { key, value, color })
        }
        [] | [_] => Err(usage.to_string()),
        [_, _, extra @ ..] => Err(format!(
            "{usage}; found extra {} (values may not contain whitespace)",
            quote_all(extra)
        )),
    }
}

fn parse_unpin(arguments: &[&str]) -> Result<Command, String> {
    let usage = "unpin takes KEY=VALUE, e.g. `unpin database=tenant_42`";
    match arguments {
        [pair] => {
            let (key, value) = parse_pin_pair(pair)?;
            Ok(Command::Unpin { key, value })
        }
        [] => Err(usage.to_string()),
        [_, extra @ ..] => Err(format!(
            "{usage}; found extra {} (values may not contain whitespace)",
            quote_all(extra)
        )),
    }
}

fn pin_keys() -> String {
    PinKey::ALL.map(PinKey::as_str).join(", ")
}

fn parse_pin_pair(pair: &str) -> Result<(PinKey, String), String> {
    let Some((key, value)) = pair.split_once('=') else {
        return Err(format!(
            "expected KEY=VALUE, found {pair:?} (KEY: {})",
            pin_keys()
        ));
    };
    let key =
        PinKey::parse(key).ok_or_else(|| format!("unknown pin key {key:?} ({})", pin_keys()))?;
    if value.is_empty() {
        return Err(format!("empty value for {}", key.as_str()));
    }
    Ok((key, value.to_string()))
}

fn parse_color(text: &str) -> Result<Color, String> {
    Color::parse(text).ok_or_else(|| format!("unknown color {text:?} (blue or green)"))
}

fn one_color(verb: &str, arguments: &[&str]) -> Result<Color, String> {
    match arguments {
        [color] => parse_color(color),
        [] => Err(format!(
            "{verb} needs a color: `{verb} blue` or `{verb} green`"
        )),
        [_, extra @ ..] => Err(format!(
            "{verb} takes one color, found extra {}",
            quote_all(extra)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &str) -> Command {
        match parse_command(line) {
            Ok(command) => command,
            Err(error) => panic!("{line:?} should parse, got: {error}"),
        }
    }

    fn refused(line: &str) -> String {
        match parse_command(line) {
            Ok(command) => panic!("{line:?} should be refused, got {command:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn status_and_reload() {
        assert_eq!(parsed("status"), Command::Status);
        assert_eq!(parsed("reload"), Command::Reload);
        assert!(refused("status now").contains("status takes no arguments"));
        assert!(refused("reload all").contains("reload takes no arguments"));
    }

    #[test]
    fn whitespace_is_tolerated() {
        assert_eq!(parsed("  status  "), Command::Status);
        assert_eq!(parsed("status\r"), Command::Status);
        assert_eq!(
            parsed("\tweight   40 \r"),
            Command::Weight { basis_points: 4000 }
        );
        assert_eq!(
            parsed("pin   database=app\t green  "),
            Command::Pin {
                key: PinKey::Database,
                value: "app".into(),
                color: Color::Green
            }
        );
    }

    #[test]
    fn weights_become_basis_points() {
        for (text, basis_points) in [
            ("0", 0),
            ("100", 10_000),
            ("100.00", 10_000),
            ("40", 4000),
            ("12.5", 1250),
            ("12.34", 1234),
            ("0.01", 1),
            ("007", 700),
            ("40%", 4000),
        ] {
            assert_eq!(
                parsed(&format!("weight {text}")),
                Command::Weight { basis_points },
                "{text}"
            );
        }
    }

    #[test]
    fn bad_weights_say_why() {
        assert!(refused("weight -1").contains("cannot be negative"));
        assert!(refused("weight 101").contains("above 100"));
        assert!(refused("weight 100.01").contains("above 100"));
        assert!(refused("weight 99999999999999999999").contains("above 100"));
        assert!(refused("weight abc").contains("not a percent"));
        assert!(refused("weight 12.345").contains("more than two decimals"));
        assert!(refused("weight").contains("needs a percent"));
        assert!(refused("weight 1e2").contains("not a percent"));
        assert!(refused("weight 12.").contains("not a percent"));
        assert!(refused("weight .5").contains("not a percent"));
        assert!(refused("weight +5").contains("not a percent"));
        assert!(refused("weight 1 2").contains("may not contain whitespace"));
    }

    #[test]
    fn rollout_actions() {
        assert_eq!(parsed("rollout start"), Command::RolloutStart);
        assert_eq!(parsed("rollout next"), Command::RolloutNext);
        assert_eq!(parsed("rollout pause"), Command::RolloutPause);
        assert_eq!(parsed("rollout resume"), Command::RolloutResume);
        assert_eq!(parsed("rollout evaluate"), Command::RolloutEvaluate);
        assert!(refused("rollout").contains("start, next, pause, resume"));
        assert!(refused("rollout stop").contains("unknown rollout action \"stop\""));
        assert!(refused("rollout start now").contains("no further arguments"));
    }

    #[test]
    fn promote_and_cutover() {
        assert_eq!(
            parsed("promote"),
            Command::Promote {
                check_only: false,
                force: false
            }
        );
        assert_eq!(
            parsed("promote --check"),
            Command::Promote {
                check_only: true,
                force: false
            }
        );
        assert_eq!(
            parsed("promote --force --check"),
            Command::Promote {
                check_only: true,
                force: true
            }
        );
        assert_eq!(
            format_command(&parsed("promote --force --check")),
            "promote --check --force"
        );
        assert!(refused("promote --now").contains("unknown promote option \"--now\""));
        assert!(refused("promote --check --check").contains("at most once each"));
        assert_eq!(parsed("cutover abort"), Command::CutoverAbort);
        assert!(refused("cutover").contains("cutover abort"));
        assert!(refused("cutover start").contains("unknown cutover action \"start\""));
        assert!(refused("cutover abort now").contains("no further arguments"));
    }

    #[test]
    fn rollback_keeps_the_rest_of_the_line_as_the_reason() {
        assert_eq!(parsed("rollback"), Command::Rollback { reason: None });
        assert_eq!(parsed("rollback   \r"), Command::Rollback { reason: None });
        assert_eq!(
            parsed("rollback  green is slow:  p95 3s "),
            Command::Rollback {
                reason: Some("green is slow:  p95 3s".into())
            }
        );
    }

    #[test]
    fn pins() {
        for key in PinKey::ALL {
            assert_eq!(
                parsed(&format!("pin {}=x blue", key.as_str())),
                Command::Pin {
                    key,
                    value: "x".into(),
                    color: Color::Blue
                }
            );
            assert_eq!(
                parsed(&format!("unpin {}=x", key.as_str())),
                Command::Unpin {
                    key,
                    value: "x".into()
                }
            );
        }
        assert_eq!(
            parsed("pin tenant=a=b green"),
            Command::Pin {
                key: PinKey::Tenant,
                value: "a=b".into(),
                color: Color::Green
            }
        );
    }

    #[test]
    fn bad_pins_name_what_is_wrong() {
        assert_eq!(
            refused("pin database=app purple"),
            "unknown color \"purple\" (blue or green)"
        );
        assert!(refused("pin host=db1 green").contains("unknown pin key \"host\""));
        assert!(refused("pin database green").contains("expected KEY=VALUE"));
        assert!(refused("pin database= green").contains("empty value for database"));
        assert!(refused("pin database=app").contains("pin takes KEY=VALUE COLOR"));
        assert!(refused("pin").contains("pin takes KEY=VALUE COLOR"));
        assert!(refused("pin database=my db green").contains("may not contain whitespace"));
        assert!(refused("unpin").contains("unpin takes KEY=VALUE"));
        assert!(refused("unpin user=a b").contains("may not contain whitespace"));
        assert!(refused("unpin colour=x").contains("unknown pin key \"colour\""));
    }

    #[test]
    fn drain_and_undrain() {
        assert_eq!(parsed("drain blue"), Command::Drain(Color::Blue));
        assert_eq!(parsed("undrain green"), Command::Undrain(Color::Green));
        assert!(refused("drain").contains("needs a color"));
        assert!(refused("undrain red").contains("unknown color \"red\""));
        assert!(refused("drain blue green").contains("one color"));
        assert!(refused("drain Blue").contains("unknown color \"Blue\""));
    }

    #[test]
    fn unknown_and_empty_commands_list_the_verbs() {
        let error = refused("frobnicate now");
        assert!(
            error.starts_with("unknown command \"frobnicate\"; commands: status, weight, rollout"),
            "{error}"
        );
        assert!(error.ends_with("undrain, reload"), "{error}");
        assert!(refused("").starts_with("empty command"));
        assert!(refused("   \r").starts_with("empty command"));
    }

    #[test]
    fn formatted_commands_parse_back() {
        let commands = [
            Command::Status,
            Command::Weight { basis_points: 0 },
            Command::Weight { basis_points: 1234 },
            Command::Weight {
                basis_points: 10_000,
            },
            Command::RolloutStart,
            Command::RolloutNext,
            Command::RolloutPause,
            Command::RolloutResume,
            Command::RolloutEvaluate,
            Command::Promote {
                check_only: false,
                force: false,
            },
            Command::Promote {
                check_only: true,
                force: false,
            },
            Command::CutoverAbort,
            Command::Rollback { reason: None },
            Command::Rollback {
                reason: Some("too slow".into()),
            },
            Command::Pin {
                key: PinKey::ApplicationName,
                value: "etl".into(),
                color: Color::Green,
            },
            Command::Unpin {
                key: PinKey::Tenant,
                value: "42".into(),
            },
            Command::Drain(Color::Blue),
            Command::Undrain(Color::Green),
            Command::Reload,
        ];
        for command in commands {
            let line = format_command(&command);
            assert_eq!(parsed(&line), command, "{line}");
        }
        assert_eq!(
            format_command(&Command::Weight { basis_points: 1250 }),
            "weight 12.5"
        );
    }

    #[test]
    fn a_command_is_one_line() {
        assert!(refused("status\nreload").contains("one line"));
        assert!(refused("rollback oops\nweight 100").contains("one line"));
        assert!(refused("rollback a\rb").contains("one line"));
        assert!(refused("status\u{7}").contains("control character"));
    }
}
