//! Markdown tables.

pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "### {}\n\n| {} |\n|{}|\n",
            self.title,
            self.header.join(" | "),
            vec!["---"; self.header.len()].join("|")
        );
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        for note in &self.notes {
            out.push_str(&format!("\n{note}\n"));
        }
        out
    }
}

/// Whether a target holds, for the last column.
pub fn verdict(met: bool) -> String {
    if met {
        "met".into()
    } else {
        "**missed**".into()
    }
}

pub fn rate(per_second: f64) -> String {
    if per_second >= 10_000.0 {
        format!("{:.0}k", per_second / 1_000.0)
    } else {
        format!("{per_second:.0}")
    }
}

pub fn ms(seconds: f64) -> String {
    format!("{:.0} ms", seconds * 1_000.0)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}
