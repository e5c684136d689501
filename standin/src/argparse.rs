//! Just enough of Python's `argparse` to reject a command line the way the
//! real scripts would: `--flag value`, `--flag=value`, unique prefixes, type
//! errors and unrecognized arguments, each an exit-2 usage error.

use crate::Failure;
use std::collections::BTreeMap;

/// The type an option converts its value to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Any text.
    Str,
    /// A Python `int`.
    Int,
    /// A Python `float`.
    Float,
    /// `store_true`: takes no value.
    Flag,
    /// Text that must be one of these (argparse's `choices`).
    Choice(&'static [&'static str]),
}

/// One `--name` option.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Opt {
    /// Without the leading dashes.
    pub name: &'static str,
    /// How its value is read.
    pub kind: Kind,
}

/// A converted option value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// From [`Kind::Str`].
    Str(String),
    /// From [`Kind::Int`].
    Int(i64),
    /// From [`Kind::Float`].
    Float(f64),
    /// From [`Kind::Flag`].
    Flag,
}

/// The options given on a command line, by name; the last occurrence wins.
#[derive(Clone, Debug, Default)]
pub(crate) struct Parsed {
    values: BTreeMap<&'static str, Value>,
}

impl Parsed {
    /// A text option's value.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.values.get(name) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An int option's value.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.values.get(name) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }

    /// A float option's value.
    pub fn float(&self, name: &str) -> Option<f64> {
        match self.values.get(name) {
            Some(Value::Float(v)) => Some(*v),
            _ => None,
        }
    }

    /// Whether a `store_true` option was given.
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::Flag))
    }
}

/// The `usage:` line argparse prints for `prog` with `opts`.
pub(crate) fn usage(prog: &str, opts: &[Opt]) -> String {
    let mut line = format!("usage: {prog} [-h]");
    for o in opts {
        match o.kind {
            Kind::Flag => line.push_str(&format!(" [--{}]", o.name)),
            Kind::Choice(choices) => line.push_str(&format!(" [--{} {{{}}}]", o.name, choices.join(","))),
            _ => line.push_str(&format!(" [--{} {}]", o.name, o.name.to_uppercase())),
        }
    }
    line
}

/// The full text of an argparse usage error.
pub(crate) fn usage_error(prog: &str, opts: &[Opt], msg: &str) -> Failure {
    Failure::Usage(format!("{}\n{prog}: error: {msg}\n", usage(prog, opts)))
}

/// Parses `args` (after the script name) against `opts`.
pub(crate) fn parse(prog: &str, opts: &[Opt], args: &[String]) -> Result<Parsed, Failure> {
    let mut parsed = Parsed::default();
    let mut unrecognized = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "-h" || arg == "--help" {
            return Err(Failure::Help(format!("{}\n", usage(prog, opts))));
        }
        if !arg.starts_with("--") || arg == "--" {
            unrecognized.push(arg.clone());
            continue;
        }
        let (name, inline) = match arg[2..].split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (&arg[2..], None),
        };
        let opt = match lookup(opts, name) {
            Lookup::Found(o) => o,
            Lookup::Ambiguous(matches) => {
                let list: Vec<String> = matches.iter().map(|o| format!("--{}", o.name)).collect();
                let msg = format!("ambiguous option: --{name} could match {}", list.join(", "));
                return Err(usage_error(prog, opts, &msg));
            }
            Lookup::Missing => {
                unrecognized.push(arg.clone());
                continue;
            }
        };
        let flag = format!("--{}", opt.name);
        if opt.kind == Kind::Flag {
            if let Some(v) = inline {
                return Err(usage_error(prog, opts, &format!("argument {flag}: ignored explicit argument '{v}'")));
            }
            parsed.values.insert(opt.name, Value::Flag);
            continue;
        }
        let raw = match inline {
            Some(v) => v,
            None => match args.get(i) {
                // argparse reads `-5` and `-a b` (it has a space) as values, `--x` as the next option.
                Some(v) if !v.starts_with('-') || v.parse::<f64>().is_ok() || v.contains(' ') => {
                    i += 1;
                    v.clone()
                }
                _ => return Err(usage_error(prog, opts, &format!("argument {flag}: expected one argument"))),
            },
        };
        let value = match opt.kind {
            Kind::Str => Value::Str(raw),
            Kind::Choice(choices) if choices.contains(&raw.as_str()) => Value::Str(raw),
            Kind::Choice(choices) => {
                let list: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
                let msg = format!("argument {flag}: invalid choice: '{raw}' (choose from {})", list.join(", "));
                return Err(usage_error(prog, opts, &msg));
            }
            Kind::Int => match python_int(&raw) {
                Some(v) => Value::Int(v),
                None => {
                    return Err(usage_error(prog, opts, &format!("argument {flag}: invalid int value: '{raw}'")));
                }
            },
            Kind::Float => match raw.trim().parse::<f64>() {
                Ok(v) => Value::Float(v),
                Err(_) => {
                    return Err(usage_error(prog, opts, &format!("argument {flag}: invalid float value: '{raw}'")));
                }
            },
            Kind::Flag => Value::Flag,
        };
        parsed.values.insert(opt.name, value);
    }
    if !unrecognized.is_empty() {
        return Err(usage_error(prog, opts, &format!("unrecognized arguments: {}", unrecognized.join(" "))));
    }
    Ok(parsed)
}

enum Lookup {
    Found(Opt),
    Ambiguous(Vec<Opt>),
    Missing,
}

/// An exact name, else a unique prefix (argparse's `allow_abbrev`).
fn lookup(opts: &[Opt], name: &str) -> Lookup {
    if let Some(o) = opts.iter().find(|o| o.name == name) {
        return Lookup::Found(*o);
    }
    if name.is_empty() {
        return Lookup::Missing;
    }
    let matches: Vec<Opt> = opts.iter().filter(|o| o.name.starts_with(name)).copied().collect();
    match matches.len() {
        0 => Lookup::Missing,
        1 => Lookup::Found(matches[0]),
        _ => Lookup::Ambiguous(matches),
    }
}

/// Python's `int(text)` for the values a command line carries: sign, digits, `_` separators.
pub(crate) fn python_int(text: &str) -> Option<i64> {
    let t = text.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    t.replace('_', "").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: &[Opt] = &[
        Opt { name: "seed", kind: Kind::Int },
        Opt { name: "guidance", kind: Kind::Float },
        Opt { name: "prompt", kind: Kind::Str },
        Opt { name: "offload_a", kind: Kind::Flag },
        Opt { name: "offload_b", kind: Kind::Flag },
        Opt { name: "level", kind: Kind::Choice(&["low", "high"]) },
    ];

    fn p(args: &[&str]) -> Result<Parsed, Failure> {
        parse("t.py", OPTS, &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn usage_text(r: Result<Parsed, Failure>) -> String {
        match r {
            Err(Failure::Usage(s)) => s,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn both_value_forms_and_last_wins() {
        let a = p(&["--seed", "3", "--guidance=2.5", "--prompt", "-x y", "--seed=4", "--offload_a"]).unwrap();
        assert_eq!(a.int("seed"), Some(4));
        assert_eq!(a.float("guidance"), Some(2.5));
        assert_eq!(a.str("prompt"), Some("-x y"));
        assert!(a.flag("offload_a") && !a.flag("offload_b"));
    }

    #[test]
    fn negative_numbers_are_values() {
        assert_eq!(p(&["--seed", "-5"]).unwrap().int("seed"), Some(-5));
    }

    #[test]
    fn prefixes_resolve_when_unique() {
        assert_eq!(p(&["--see", "7"]).unwrap().int("seed"), Some(7));
        assert!(usage_text(p(&["--offload"])).contains("ambiguous option: --offload could match"));
    }

    #[test]
    fn errors_read_like_argparse() {
        let e = usage_text(p(&["--x", "1", "--seed", "2", "stray"]));
        assert!(e.starts_with("usage: t.py [-h] [--seed SEED]"), "{e}");
        assert!(e.ends_with("t.py: error: unrecognized arguments: --x 1 stray\n"), "{e}");
        assert!(usage_text(p(&["--seed", "abc"])).contains("argument --seed: invalid int value: 'abc'"));
        assert!(usage_text(p(&["--guidance=x"])).contains("argument --guidance: invalid float value: 'x'"));
        assert!(usage_text(p(&["--seed"])).contains("argument --seed: expected one argument"));
        assert!(usage_text(p(&["--offload_a=1"])).contains("ignored explicit argument '1'"));
    }

    #[test]
    fn choices_are_checked_like_argparse() {
        assert_eq!(p(&["--level", "high"]).unwrap().str("level"), Some("high"));
        let e = usage_text(p(&["--level=max"]));
        assert!(e.contains("[--level {low,high}]"), "{e}");
        assert!(
            e.ends_with("t.py: error: argument --level: invalid choice: 'max' (choose from 'low', 'high')\n"),
            "{e}"
        );
    }

    #[test]
    fn python_ints() {
        assert_eq!(python_int(" +1_000 "), Some(1000));
        assert_eq!(python_int("1__0"), None);
        assert_eq!(python_int("1.0"), None);
        assert_eq!(python_int(""), None);
    }
}
