//! Multi-document YAML files as JSON values, each document remembering where it came from.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Why a file could not be read as YAML.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {index}: {source}")]
    Yaml {
        path: String,
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// One YAML document of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub file: PathBuf,
    /// Position among the file's non-empty documents, from 0.
    pub index: usize,
    pub value: Value,
}

/// Reads every non-empty document of `path`.
pub fn load(path: &Path) -> Result<Vec<Document>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: crate::paths::display(path),
        source,
    })?;
    parse(&text, path)
}

/// Parses every non-empty document of `text`; `file` only names them.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Document>, Error> {
    let mut documents = Vec::new();
    for (position, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|source| Error::Yaml {
            path: crate::paths::display(file),
            index: position,
            source,
        })?;
        // A leading `---` or a document of comments only reads as null.
        if value.is_null() {
            continue;
        }
        documents.push(Document {
            file: file.to_path_buf(),
            index: documents.len(),
            value,
        });
    }
    Ok(documents)
}

// === impl Document ===

impl Document {
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or_default()
    }

    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }

    /// Whether the document is a Kubernetes object at all (has `apiVersion` and `kind`).
    pub fn is_object(&self) -> bool {
        !self.api_version().is_empty() && !self.kind().is_empty()
    }

    /// Parses `text` as YAML into a value, for a string field holding a document of its own.
    pub fn embedded(text: &str) -> Result<Value, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(text)
    }
}

impl fmt::Display for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] {} {}",
            crate::paths::display(&self.file),
            self.index,
            self.kind(),
            self.name()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn empty_documents_and_comment_only_documents_are_skipped() {
        let text = "---\n# only a comment\n---\na: 1\n---\n---\nb: [2]\n";
        let documents = parse(text, Path::new("x.yaml")).expect("parses");
        let values: Vec<_> = documents.iter().map(|d| d.value.clone()).collect();
        assert_eq!(
            values,
            vec![serde_json::json!({"a": 1}), serde_json::json!({"b": [2]})]
        );
        assert_eq!(documents[1].index, 1);
    }

    #[test]
    fn a_broken_document_is_named_by_its_position() {
        let error = parse("a: 1\n---\nb: [\n", Path::new("x.yaml")).expect_err("broken");
        assert!(error.to_string().contains("document 1"), "{error}");
    }
}
