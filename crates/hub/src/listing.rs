//! Which Parquet files make a dataset's config and split.
//!
//! One request: the dataset's info at the revision (`/api/datasets/OWNER/NAME/revision/REV`),
//! which names the revision's commit, every file, and the card's `configs:` with their
//! `data_files` patterns. Files are then addressed at that commit, so a run reads one fixed
//! version of the dataset however the branch moves.
//!
//! Without `configs:` in the card, the Hub's conventions decide: a file belongs to a split when
//! a directory on its path is named after it or its name starts with it (`train-00000-of-...`);
//! if no file names any split, every Parquet file is `train`.

use globset::{GlobBuilder, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{HubClient, HubError, block_on_own_thread};

/// The most the dataset's info may hold (the-stack-v2-dedup's, with thousands of files, is a
/// few MiB).
const MAX_INFO_BYTES: u64 = 64 << 20;

/// A dataset on the Hub and the part of it to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    /// `OWNER/NAME`.
    pub repo: String,
    /// The config (a card's `config_name`); `None` is the card's default.
    pub config: Option<String>,
    pub split: String,
    /// A branch, tag or commit.
    pub revision: String,
    /// The Hub's address, when not `HF_ENDPOINT` or the public Hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// One Parquet file of a dataset at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// The Hub it was listed on.
    pub endpoint: String,
    pub repo: String,
    /// The commit the revision named when the dataset was listed.
    pub commit: String,
    /// The file's path in the repository.
    pub path: String,
}

impl HubFile {
    /// The file's download address.
    pub fn url(&self) -> String {
        let path: Vec<String> = self.path.split('/').map(percent_encode).collect();
        format!(
            "{}/datasets/{}/resolve/{}/{}",
            self.endpoint,
            self.repo,
            self.commit,
            path.join("/")
        )
    }
}

fn percent_encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[derive(Deserialize)]
struct DatasetInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
    #[serde(rename = "cardData", default)]
    card_data: Option<Value>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// One `configs:` entry of a dataset card.
struct CardConfig {
    name: String,
    default: bool,
    /// (split, path patterns).
    splits: Vec<(String, Vec<String>)>,
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn card_configs(card: &Value) -> Vec<CardConfig> {
    let Some(configs) = card.get("configs").and_then(Value::as_array) else {
        return Vec::new();
    };
    configs
        .iter()
        .filter_map(|entry| {
            let name = entry.get("config_name")?.as_str()?.to_string();
            let default = entry.get("default").and_then(Value::as_bool) == Some(true);
            let data_files = entry.get("data_files").cloned().unwrap_or(Value::Null);
            let splits = match &data_files {
                Value::Array(items) if items.iter().all(Value::is_object) => items
                    .iter()
                    .filter_map(|item| {
                        let split = item.get("split")?.as_str()?.to_string();
                        Some((split, strings(item.get("path")?)))
                    })
                    .collect(),
                Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), strings(v))).collect(),
                other => vec![("train".to_string(), strings(other))],
            };
            Some(CardConfig {
                name,
                default,
                splits,
            })
        })
        .collect()
}

/// The commit of `dataset.revision` and its Parquet files for the config and split, in path
/// order.
pub fn list_parquet_files(hub: &HubClient, dataset: &DatasetRef) -> Result<Vec<HubFile>, HubError> {
    if dataset.repo.split('/').count() != 2 || dataset.repo.split('/').any(str::is_empty) {
        return Err(HubError::Usage(format!(
            "'{}' is not a dataset name; give OWNER/NAME, e.g. bigcode/the-stack-v2-dedup",
            dataset.repo
        )));
    }
    let what = format!(
        "dataset {} at revision {} on {}",
        dataset.repo,
        dataset.revision,
        hub.endpoint()
    );
    let url = format!(
        "{}/api/datasets/{}/revision/{}",
        hub.endpoint(),
        dataset.repo,
        percent_encode(&dataset.revision)
    );
    let fetched = block_on_own_thread(hub.fetch(&url, None, MAX_INFO_BYTES, &what))?;
    let info: DatasetInfo =
        serde_json::from_slice(&fetched.body).map_err(|e| HubError::Malformed {
            what: what.clone(),
            reason: format!("the dataset's info is not what the Hub answers: {e}"),
        })?;
    let parquet: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    let configs = info
        .card_data
        .as_ref()
        .map(card_configs)
        .unwrap_or_default();
    let mut paths: Vec<String> = if configs.is_empty() {
        if let Some(config) = dataset.config.as_deref().filter(|c| *c != "default") {
            return Err(HubError::Usage(format!(
                "{what}: its card names no configs, so there is no config '{config}'; leave out \
                 --hf-config"
            )));
        }
        by_convention(&parquet, &dataset.split)
    } else {
        let config = choose_config(&configs, dataset.config.as_deref(), &what)?;
        let Some((_, patterns)) = config.splits.iter().find(|(s, _)| *s == dataset.split) else {
            let splits: Vec<&str> = config.splits.iter().map(|(s, _)| s.as_str()).collect();
            return Err(HubError::Usage(format!(
                "{what}: config '{}' has no split '{}' (it has: {})",
                config.name,
                dataset.split,
                splits.join(", ")
            )));
        };
        matching(&parquet, patterns, &what)?
    };
    paths.sort();
    if paths.is_empty() {
        return Err(HubError::Usage(format!(
            "{what}: no Parquet files for split '{}'{}",
            dataset.split,
            dataset
                .config
                .as_ref()
                .map(|c| format!(" of config '{c}'"))
                .unwrap_or_default()
        )));
    }
    Ok(paths
        .into_iter()
        .map(|path| HubFile {
            endpoint: hub.endpoint().to_string(),
            repo: dataset.repo.clone(),
            commit: info.sha.clone(),
            path,
        })
        .collect())
}

fn choose_config<'a>(
    configs: &'a [CardConfig],
    wanted: Option<&str>,
    what: &str,
) -> Result<&'a CardConfig, HubError> {
    let names = || {
        let mut names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        if names.len() > 12 {
            names.truncate(12);
            names.push("…");
        }
        names.join(", ")
    };
    let found = match wanted {
        Some(name) => configs.iter().find(|c| c.name == name),
        None => configs
            .iter()
            .find(|c| c.default)
            .or_else(|| configs.iter().find(|c| c.name == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0])),
    };
    found.ok_or_else(|| {
        HubError::Usage(match wanted {
            Some(name) => format!("{what}: no config '{name}' (it has: {})", names()),
            None => format!(
                "{what}: it has several configs and no default; choose one with --hf-config ({})",
                names()
            ),
        })
    })
}

/// The files matching a card's `data_files` patterns (`*` stays within a directory, `**`
/// crosses them, as the Hub resolves them).
fn matching(files: &[&str], patterns: &[String], what: &str) -> Result<Vec<String>, HubError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .map_err(|e| HubError::Malformed {
                what: what.to_string(),
                reason: format!("the card's data_files pattern '{pattern}': {e}"),
            })?;
        set.add(glob);
    }
    let set = set.build().map_err(|e| HubError::Malformed {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    Ok(files
        .iter()
        .filter(|f| set.is_match(f))
        .map(|f| f.to_string())
        .collect())
}

fn by_convention(files: &[&str], split: &str) -> Vec<String> {
    let names_split = |path: &str, split: &str| {
        let mut parts = path.split('/').collect::<Vec<_>>();
        let file = parts.pop().unwrap_or_default();
        parts.contains(&split)
            || [
                format!("{split}-"),
                format!("{split}."),
                format!("{split}_"),
            ]
            .iter()
            .any(|p| file.starts_with(p.as_str()))
    };
    let chosen: Vec<String> = files
        .iter()
        .filter(|f| names_split(f, split))
        .map(|f| f.to_string())
        .collect();
    let any_split_named = ["train", "test", "validation", "valid", "dev"]
        .iter()
        .any(|s| files.iter().any(|f| names_split(f, s)));
    if chosen.is_empty() && split == "train" && !any_split_named {
        return files.iter().map(|f| f.to_string()).collect();
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_patterns_keep_star_within_a_directory() {
        let files = [
            "data/Python/train-0.parquet",
            "data/Python/sub/train-1.parquet",
            "data/Rust/train-0.parquet",
        ];
        let got = matching(&files, &["data/Python/*.parquet".into()], "x").unwrap();
        assert_eq!(got, vec!["data/Python/train-0.parquet"]);
        let got = matching(&files, &["data/**/*.parquet".into()], "x").unwrap();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn the_conventions_find_splits_by_directory_and_prefix() {
        let files = [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "validation/part.parquet",
        ];
        assert_eq!(by_convention(&files, "train").len(), 2);
        assert_eq!(
            by_convention(&files, "validation"),
            vec!["validation/part.parquet"]
        );
        let unnamed = ["a.parquet", "b/c.parquet"];
        assert_eq!(by_convention(&unnamed, "train").len(), 2);
        assert!(by_convention(&unnamed, "test").is_empty());
    }

    #[test]
    fn card_configs_read_every_data_files_shape() {
        let card: Value = serde_json::json!({"configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "data/*/*.parquet"}]},
            {"config_name": "Python", "data_files": [{"split": "train", "path": ["data/Python/*.parquet"]}]},
            {"config_name": "flat", "data_files": "x/*.parquet"},
            {"config_name": "map", "default": true, "data_files": {"test": "t/*.parquet"}},
        ]});
        let configs = card_configs(&card);
        assert_eq!(configs.len(), 4);
        assert_eq!(configs[1].splits[0].1, vec!["data/Python/*.parquet"]);
        assert_eq!(configs[2].splits[0].0, "train");
        assert_eq!(choose_config(&configs, None, "x").unwrap().name, "map");
        assert!(choose_config(&configs, Some("Go"), "x").is_err());
    }

    #[test]
    fn file_urls_are_pinned_and_encoded() {
        let file = HubFile {
            endpoint: "http://h".into(),
            repo: "o/n".into(),
            commit: "abc".into(),
            path: "data/C++/a b.parquet".into(),
        };
        assert_eq!(
            file.url(),
            "http://h/datasets/o/n/resolve/abc/data/C%2B%2B/a%20b.parquet"
        );
    }
}
