//! A renderer for the part of Helm's Go templates the flyball chart uses, so the chart can be
//! checked without a `helm` binary.
//!
//! Supported, with Go's semantics: `{{ pipeline }}`, the trim markers `{{-` and `-}}`, comments
//! `{{/* ... */}}`, `if` / `else` / `end`, `range` over a list (`.` is the element, `$` the
//! root), fields `.A.b` and `$.A.b`, string and integer literals, and the functions `quote`,
//! `default`, `toYaml`, `indent` and `nindent`. Anything else (`include`, `with`, `else if`,
//! variables, ...) is an error naming the template and line, so a chart change that needs more
//! fails here instead of rendering wrong.
//!
//! One deliberate difference: printing a missing value is an error (Helm prints `<no value>`),
//! which catches misspelled value paths.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// Why a chart could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{template}:{line}: {message}")]
    Template {
        template: String,
        line: usize,
        message: String,
    },
}

/// A chart as read from its directory.
#[derive(Debug, Clone)]
pub struct Chart {
    pub dir: PathBuf,
    /// `Chart.yaml`.
    pub metadata: Value,
    /// `values.yaml`.
    pub values: Value,
    /// `templates/*.yaml` (helpers and notes excluded), sorted by name.
    pub templates: Vec<Template>,
}

/// One template file.
#[derive(Debug, Clone)]
pub struct Template {
    /// Relative to the chart, e.g. `templates/deployment.yaml`.
    pub name: String,
    pub text: String,
}

/// What `helm install` would be told.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// One rendered template.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub template: String,
    pub text: String,
}

// === impl Chart ===

impl Chart {
    pub fn load(dir: &Path) -> Result<Chart, Error> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: crate::paths::display(path),
                source,
            })
        };
        let yaml = |path: &Path| -> Result<Value, Error> {
            serde_yaml_ng::from_str(&read(path)?).map_err(|source| Error::Yaml {
                path: crate::paths::display(path),
                source,
            })
        };
        let metadata = yaml(&dir.join("Chart.yaml"))?;
        let values = yaml(&dir.join("values.yaml"))?;
        let templates_dir = dir.join("templates");
        let files =
            crate::paths::files_under(&templates_dir, &["yaml", "yml"]).map_err(|source| {
                Error::Read {
                    path: crate::paths::display(&templates_dir),
                    source,
                }
            })?;
        let mut templates = Vec::new();
        for path in files {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // Helm renders `_*` files only as definitions, never as output.
            if file_name.starts_with('_') {
                continue;
            }
            templates.push(Template {
                name: format!("templates/{file_name}"),
                text: read(&path)?,
            });
        }
        Ok(Chart {
            dir: dir.to_path_buf(),
            metadata,
            values,
            templates,
        })
    }

    /// The chart's name from `Chart.yaml`.
    pub fn name(&self) -> &str {
        self.metadata["name"].as_str().unwrap_or_default()
    }

    /// Renders every template with `values` (the chart's defaults, or a test's variation).
    pub fn render(&self, values: &Value, release: Release<'_>) -> Result<Vec<Rendered>, Error> {
        let root = json!({
            "Values": values,
            "Release": {
                "Name": release.name,
                "Namespace": release.namespace,
                "Service": "Helm",
            },
            "Chart": {
                "Name": self.metadata["name"],
                "Version": self.metadata["version"],
                "AppVersion": self.metadata["appVersion"],
            },
        });
        self.templates
            .iter()
            .map(|template| {
                Ok(Rendered {
                    template: template.name.clone(),
                    text: render_str(&template.text, &root).map_err(|e| Error::Template {
                        template: template.name.clone(),
                        line: e.line,
                        message: e.message,
                    })?,
                })
            })
            .collect()
    }
}

/// Helm's install order by kind (helm pkg/releaseutil/kind_sorter.go); other kinds go last.
const INSTALL_ORDER: &[&str] = &[
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
];

/// Joins rendered templates into one multi-document stream as `helm template` prints it: one
/// document per object, each headed by its template, in Helm's install order (so `kubectl apply`
/// of the result creates a ServiceAccount before the Deployment that runs as it).
pub fn join(chart_name: &str, rendered: &[Rendered]) -> String {
    let mut documents = Vec::new();
    for r in rendered {
        let mut current = String::new();
        for line in r.text.lines() {
            if line.trim_end() == "---" {
                documents.push((r.template.as_str(), std::mem::take(&mut current)));
            } else {
                current.push_str(line);
                current.push('\n');
            }
        }
        documents.push((r.template.as_str(), current));
    }
    documents.retain(|(_, body)| {
        body.lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
    });
    let rank = |body: &str| {
        let kind = body
            .lines()
            .find_map(|l| l.strip_prefix("kind:"))
            .map(str::trim)
            .unwrap_or_default();
        INSTALL_ORDER
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(INSTALL_ORDER.len())
    };
    documents.sort_by_key(|(_, body)| rank(body));
    let mut out = String::new();
    for (template, body) in documents {
        let _ = write!(
            out,
            "---\n# Source: {chart_name}/{template}\n{}\n",
            body.trim_matches('\n')
        );
    }
    out
}

/// A template error with the line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    pub line: usize,
    pub message: String,
}

/// Renders one template against `root` (`.` and `$` at the top).
pub fn render_str(text: &str, root: &Value) -> Result<String, TemplateError> {
    let tokens = lex(text)?;
    let mut position = 0;
    let (nodes, end) = parse_block(&tokens, &mut position)?;
    if let Some((keyword, line)) = end {
        return Err(TemplateError {
            line,
            message: format!("unexpected {{{{ {keyword} }}}}"),
        });
    }
    let mut out = String::new();
    execute(&nodes, root, root, &mut out)?;
    Ok(out)
}

// ===== lexing =====

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Text(String),
    Action { body: String, line: usize },
}

fn lex(text: &str) -> Result<Vec<Token>, TemplateError> {
    let mut tokens = Vec::new();
    let mut rest = text;
    let mut line = 1;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut before = &rest[..open];
        if trim_next {
            before = before.trim_start();
        }
        let after_open = &rest[open + 2..];
        let Some(close) = after_open.find("}}") else {
            return Err(TemplateError {
                line: line + before.matches('\n').count(),
                message: "unclosed action".into(),
            });
        };
        let mut body = &after_open[..close];
        // Go requires a space after `{{-` and before `-}}`; `{{-3}}` is the number -3.
        let trim_before = body.starts_with("- ") || body.starts_with("-\n") || body == "-";
        if trim_before {
            body = &body[1..];
            before = before.trim_end();
        }
        trim_next = body.ends_with(" -") || body.ends_with("\n-");
        if trim_next {
            body = &body[..body.len() - 1];
        }
        line += rest[..open].matches('\n').count();
        if !before.is_empty() {
            tokens.push(Token::Text(before.to_string()));
        }
        let body = body.trim();
        if !(body.starts_with("/*") && body.ends_with("*/")) {
            tokens.push(Token::Action {
                body: body.to_string(),
                line,
            });
        }
        line += after_open[..close].matches('\n').count();
        rest = &after_open[close + 2..];
    }
    let tail = if trim_next { rest.trim_start() } else { rest };
    if !tail.is_empty() {
        tokens.push(Token::Text(tail.to_string()));
    }
    Ok(tokens)
}

// ===== parsing =====

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Output {
        pipeline: Pipeline,
        line: usize,
    },
    If {
        condition: Pipeline,
        then: Vec<Node>,
        otherwise: Vec<Node>,
        line: usize,
    },
    Range {
        pipeline: Pipeline,
        body: Vec<Node>,
        line: usize,
    },
}

/// Commands separated by `|`; each command is its words.
type Pipeline = Vec<Vec<Word>>;

#[derive(Debug, Clone, PartialEq)]
enum Word {
    /// `.` followed by field names (empty: `.` itself).
    Dot(Vec<String>),
    /// `$` followed by field names.
    Root(Vec<String>),
    Str(String),
    Int(i64),
    Function(String),
}

/// The keyword that ended a block (`end` or `else`) and its line; `None` at the end of input.
type BlockEnd = Option<(&'static str, usize)>;

/// Parses until `{{ end }}` or `{{ else }}` or the end of input.
fn parse_block(
    tokens: &[Token],
    position: &mut usize,
) -> Result<(Vec<Node>, BlockEnd), TemplateError> {
    let mut nodes = Vec::new();
    while let Some(token) = tokens.get(*position) {
        *position += 1;
        let (body, line) = match token {
            Token::Text(text) => {
                nodes.push(Node::Text(text.clone()));
                continue;
            }
            Token::Action { body, line } => (body.as_str(), *line),
        };
        let (keyword, rest) = body
            .split_once(char::is_whitespace)
            .map_or((body, ""), |(k, r)| (k, r.trim()));
        match keyword {
            "end" if rest.is_empty() => return Ok((nodes, Some(("end", line)))),
            "else" if rest.is_empty() => return Ok((nodes, Some(("else", line)))),
            "if" => {
                let condition = parse_pipeline(rest, line)?;
                let (then, end) = parse_block(tokens, position)?;
                let otherwise = match end {
                    Some(("end", _)) => Vec::new(),
                    Some(("else", _)) => {
                        let (otherwise, end) = parse_block(tokens, position)?;
                        expect_end(end, line)?;
                        otherwise
                    }
                    _ => return Err(unclosed("if", line)),
                };
                nodes.push(Node::If {
                    condition,
                    then,
                    otherwise,
                    line,
                });
            }
            "range" => {
                if rest.contains(":=") {
                    return Err(unsupported("range with variables", line));
                }
                let pipeline = parse_pipeline(rest, line)?;
                let (body, end) = parse_block(tokens, position)?;
                expect_end(end, line)?;
                nodes.push(Node::Range {
                    pipeline,
                    body,
                    line,
                });
            }
            "else" | "end" | "with" | "define" | "template" | "block" | "break" | "continue" => {
                return Err(unsupported(body, line));
            }
            _ => nodes.push(Node::Output {
                pipeline: parse_pipeline(body, line)?,
                line,
            }),
        }
    }
    Ok((nodes, None))
}

fn expect_end(end: BlockEnd, line: usize) -> Result<(), TemplateError> {
    match end {
        Some(("end", _)) => Ok(()),
        Some((keyword, at)) => Err(TemplateError {
            line: at,
            message: format!("unexpected {{{{ {keyword} }}}}"),
        }),
        None => Err(unclosed("block", line)),
    }
}

fn unclosed(what: &str, line: usize) -> TemplateError {
    TemplateError {
        line,
        message: format!("{what} without {{{{ end }}}}"),
    }
}

fn unsupported(what: &str, line: usize) -> TemplateError {
    TemplateError {
        line,
        message: format!("not supported by this renderer: {{{{ {what} }}}}"),
    }
}

fn parse_pipeline(text: &str, line: usize) -> Result<Pipeline, TemplateError> {
    let error = |message: String| TemplateError { line, message };
    let mut commands = vec![Vec::new()];
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '|' {
            chars.next();
            commands.push(Vec::new());
        } else if c == '"' {
            chars.next();
            let mut literal = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => literal.push('\n'),
                        Some(other) => literal.push(other),
                        None => return Err(error("unterminated string".into())),
                    },
                    Some(other) => literal.push(other),
                    None => return Err(error("unterminated string".into())),
                }
            }
            push_word(&mut commands, Word::Str(literal));
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '|' {
                    break;
                }
                word.push(c);
                chars.next();
            }
            let parsed = if word == "." {
                Word::Dot(Vec::new())
            } else if let Some(path) = word.strip_prefix('.') {
                Word::Dot(path.split('.').map(str::to_string).collect())
            } else if word == "$" {
                Word::Root(Vec::new())
            } else if let Some(path) = word.strip_prefix("$.") {
                Word::Root(path.split('.').map(str::to_string).collect())
            } else if let Ok(n) = word.parse::<i64>() {
                Word::Int(n)
            } else if word.chars().all(|c| c.is_ascii_alphanumeric()) {
                Word::Function(word)
            } else {
                return Err(error(format!("not supported by this renderer: {word:?}")));
            };
            push_word(&mut commands, parsed);
        }
    }
    if commands.iter().any(Vec::is_empty) {
        return Err(error(format!("empty command in {text:?}")));
    }
    Ok(commands)
}

fn push_word(commands: &mut [Vec<Word>], word: Word) {
    if let Some(last) = commands.last_mut() {
        last.push(word);
    }
}

// ===== execution =====

fn execute(
    nodes: &[Node],
    root: &Value,
    dot: &Value,
    out: &mut String,
) -> Result<(), TemplateError> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Output { pipeline, line } => {
                let value = evaluate(pipeline, root, dot, *line)?;
                out.push_str(&print(&value, *line)?);
            }
            Node::If {
                condition,
                then,
                otherwise,
                line,
            } => {
                let branch = if truthy(&evaluate(condition, root, dot, *line)?) {
                    then
                } else {
                    otherwise
                };
                execute(branch, root, dot, out)?;
            }
            Node::Range {
                pipeline,
                body,
                line,
            } => match evaluate(pipeline, root, dot, *line)? {
                Value::Array(items) => {
                    for item in &items {
                        execute(body, root, item, out)?;
                    }
                }
                Value::Null => {}
                other => {
                    return Err(TemplateError {
                        line: *line,
                        message: format!("range over {other}: only lists are supported"),
                    });
                }
            },
        }
    }
    Ok(())
}

fn evaluate(
    pipeline: &Pipeline,
    root: &Value,
    dot: &Value,
    line: usize,
) -> Result<Value, TemplateError> {
    let mut piped: Option<Value> = None;
    for command in pipeline {
        piped = Some(command_value(command, piped, root, dot, line)?);
    }
    Ok(piped.unwrap_or(Value::Null))
}

fn command_value(
    command: &[Word],
    piped: Option<Value>,
    root: &Value,
    dot: &Value,
    line: usize,
) -> Result<Value, TemplateError> {
    let error = |message: String| TemplateError { line, message };
    let Some((first, args)) = command.split_first() else {
        return Err(error("empty command".into()));
    };
    let Word::Function(name) = first else {
        if !args.is_empty() || piped.is_some() {
            return Err(error(format!("{first:?} is not a function")));
        }
        return term(first, root, dot, line);
    };
    let mut values = args
        .iter()
        .map(|a| term(a, root, dot, line))
        .collect::<Result<Vec<_>, _>>()?;
    values.extend(piped);
    let arity = |n: usize| {
        if values.len() == n {
            Ok(())
        } else {
            Err(error(format!(
                "{name} takes {n} arguments, got {}",
                values.len()
            )))
        }
    };
    match name.as_str() {
        "quote" => {
            arity(1)?;
            Ok(Value::String(go_quote(&print(&values[0], line)?)))
        }
        "default" => {
            arity(2)?;
            let given = values.pop().unwrap_or(Value::Null);
            let fallback = values.pop().unwrap_or(Value::Null);
            Ok(if truthy(&given) { given } else { fallback })
        }
        "toYaml" => {
            arity(1)?;
            let yaml =
                serde_yaml_ng::to_string(&values[0]).map_err(|e| error(format!("toYaml: {e}")))?;
            // Helm's toYaml trims the final newline.
            Ok(Value::String(yaml.trim_end_matches('\n').to_string()))
        }
        "indent" | "nindent" => {
            arity(2)?;
            let width = values[0]
                .as_u64()
                .ok_or_else(|| error(format!("{name}: width must be a number")))?;
            let text = print(&values[1], line)?;
            let pad = " ".repeat(usize::try_from(width).unwrap_or(0));
            let indented = text
                .split('\n')
                .map(|l| format!("{pad}{l}"))
                .collect::<Vec<_>>()
                .join("\n");
            Ok(Value::String(if name == "nindent" {
                format!("\n{indented}")
            } else {
                indented
            }))
        }
        other => Err(error(format!(
            "not supported by this renderer: function {other}"
        ))),
    }
}

fn term(word: &Word, root: &Value, dot: &Value, line: usize) -> Result<Value, TemplateError> {
    let walk = |start: &Value, path: &[String]| -> Result<Value, TemplateError> {
        let mut at = start;
        for (i, field) in path.iter().enumerate() {
            at = match at {
                Value::Object(map) => match map.get(field) {
                    Some(next) => next,
                    // Go templates yield nil for a missing map key.
                    None => return Ok(Value::Null),
                },
                Value::Null => return Ok(Value::Null),
                other => {
                    return Err(TemplateError {
                        line,
                        message: format!(
                            "cannot read field {field:?} of {} ({other})",
                            path[..i].join(".")
                        ),
                    });
                }
            };
        }
        Ok(at.clone())
    };
    match word {
        Word::Dot(path) => walk(dot, path),
        Word::Root(path) => walk(root, path),
        Word::Str(s) => Ok(Value::String(s.clone())),
        Word::Int(n) => Ok(Value::from(*n)),
        Word::Function(name) => Err(TemplateError {
            line,
            message: format!("function {name} used as a value"),
        }),
    }
}

/// Go's truth: false, 0, nil and empty strings, lists and maps are false.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn print(value: &Value, line: usize) -> Result<String, TemplateError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Err(TemplateError {
            line,
            message: "no value (a misspelled or missing value?)".into(),
        }),
        Value::Array(_) | Value::Object(_) => Err(TemplateError {
            line,
            message: format!("cannot print {value} directly: use toYaml"),
        }),
    }
}

/// Go's `strconv.Quote`, which Helm's `quote` uses, for the characters that need escaping.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A values object with `path` (dot-separated) set to `value`, for rendering variations.
pub fn with_value(values: &Value, path: &str, value: Value) -> Value {
    let mut values = values.clone();
    let mut at = &mut values;
    for field in path.split('.') {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        let Value::Object(map) = at else {
            break;
        };
        at = map.entry(field.to_string()).or_insert(Value::Null);
    }
    *at = value;
    values
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn render(text: &str, values: Value) -> Result<String, TemplateError> {
        let root = json!({"Values": values, "Release": {"Name": "rel", "Namespace": "ns"}});
        render_str(text, &root)
    }

    #[test]
    fn trim_markers_remove_whitespace_and_newlines_on_their_side_only() {
        let out = render(
            "a:\n  {{- if .Values.on }}\n  b: 1\n  {{- end }}\nc: 2\n",
            json!({"on": true}),
        );
        assert_eq!(out.as_deref(), Ok("a:\n  b: 1\nc: 2\n"));
        let out = render("x {{ .Release.Name -}}   \n  y", json!({}));
        assert_eq!(out.as_deref(), Ok("x rely"));
    }

    #[test]
    fn if_else_follows_go_truthiness() {
        let text = "{{ if .Values.x }}yes{{ else }}no{{ end }}";
        for (x, expected) in [
            (json!(0), "no"),
            (json!(""), "no"),
            (json!({}), "no"),
            (json!([]), "no"),
            (json!(null), "no"),
            (json!(2), "yes"),
            (json!("a"), "yes"),
            (json!({"k": 1}), "yes"),
        ] {
            assert_eq!(
                render(text, json!({ "x": x })).as_deref(),
                Ok(expected),
                "{x}"
            );
        }
    }

    #[test]
    fn range_binds_dot_to_each_element_and_dollar_to_the_root() {
        let text = "{{- range .Values.ns }}\n- {{ . }}/{{ $.Release.Name }}\n{{- end }}\n";
        assert_eq!(
            render(text, json!({"ns": ["a", "b"]})).as_deref(),
            Ok("\n- a/rel\n- b/rel\n")
        );
    }

    #[test]
    fn functions_pipe_their_input_as_the_last_argument() {
        assert_eq!(
            render("{{ .Values.tag | default \"1.0\" | quote }}", json!({})).as_deref(),
            Ok("\"1.0\"")
        );
        assert_eq!(
            render("{{ .Values.tag | default \"1.0\" }}", json!({"tag": "2"})).as_deref(),
            Ok("2")
        );
        assert_eq!(
            render(
                "r:{{- toYaml .Values.r | nindent 2 }}",
                json!({"r": {"b": 1, "a": [1, 2]}})
            )
            .as_deref(),
            Ok("r:\n  a:\n  - 1\n  - 2\n  b: 1")
        );
        assert_eq!(
            render("{{ quote .Values.s }}", json!({"s": "a\"b"})).as_deref(),
            Ok("\"a\\\"b\"")
        );
    }

    #[test]
    fn printing_a_missing_value_is_an_error_with_its_line() {
        let error =
            render("a: 1\nb: {{ .Values.mising }}\n", json!({"missing": 1})).expect_err("missing");
        assert_eq!(error.line, 2);
    }

    #[test]
    fn constructs_outside_the_subset_are_refused() {
        for text in [
            "{{ include \"x\" . }}",
            "{{ with .Values }}{{ end }}",
            "{{ if .Values.a }}{{ else if .Values.b }}{{ end }}",
            "{{ range $i, $v := .Values.l }}{{ end }}",
            "{{ if .Values.a }}",
            "{{ end }}",
        ] {
            assert!(render(text, json!({"a": 1, "l": [1]})).is_err(), "{text}");
        }
    }

    #[test]
    fn join_orders_objects_as_helm_installs_them() {
        let rendered = [
            Rendered {
                template: "templates/a.yaml".into(),
                text: "# about a\nkind: Deployment\n".into(),
            },
            Rendered {
                template: "templates/b.yaml".into(),
                text: "kind: ClusterRole\n---\n# only a comment\n---\nkind: ServiceAccount\n"
                    .into(),
            },
        ];
        assert_eq!(
            join("c", &rendered),
            "---\n# Source: c/templates/b.yaml\nkind: ServiceAccount\n\
             ---\n# Source: c/templates/b.yaml\nkind: ClusterRole\n\
             ---\n# Source: c/templates/a.yaml\n# about a\nkind: Deployment\n"
        );
    }

    #[test]
    fn with_value_sets_a_nested_path() {
        let values = with_value(&json!({"a": {"b": 1}}), "a.c.d", json!(true));
        assert_eq!(values, json!({"a": {"b": 1, "c": {"d": true}}}));
    }
}
