//! AUTOMATIC1111's prompt syntax, as text: emphasis brackets, explicit weights, escapes,
//! `BREAK` and extra-network tags. Pure text, no tensors; what the weights do to the text
//! encoder's output is [`crate::clip::ClipTextModel::encode_weighted_chunks`], and how weighted
//! tokens are cut into chunks is [`crate::tokenizer::ClipTokenizer::encode_weighted_chunks`].
//!
//! The rules (A1111's `parse_prompt_attention`, `sd_hijack_clip` and `extra_networks`):
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1; brackets nest and
//!   their factors multiply. `(text:1.5)` multiplies by 1.5 instead of 1.1.
//! - `\(`, `\)`, `\[`, `\]` and `\\` are the literal characters; a backslash before anything
//!   else disappears.
//! - A closing bracket with no open one of its kind is literal text, and so is `:1.5)` with no
//!   open `(`. Brackets still open at the end apply to everything after them (all open `(`
//!   first, then all open `[`).
//! - `BREAK`, upper case, as a word of its own (with the white space around it), ends the
//!   current 75-token chunk.
//! - Neighbouring runs of text with equal weights are merged (each run is tokenized on its own).
//! - `<kind:args>` tags (`<lora:name:0.7>`, `<hypernet:name:1>`: extra networks) are removed
//!   from the prompt. This service has no extra networks, so they are returned as ignored.
//!
//! Differences from A1111, on purpose:
//!
//! - `BREAK` inside brackets still breaks the chunk. A1111 multiplies its internal marker by
//!   the brackets' weight, after which it no longer recognises it and encodes the word "break"
//!   with a negative weight.
//! - A weight that is not a number (`(a:1.2.3)`) makes A1111 fail the request; here `:1.2.3`
//!   is literal text and the `)` closes the bracket with the usual 1.1.
//! - Prompt editing and alternation (`[a:b:0.5]`, `[a|b]`) are not parsed: they are read as
//!   emphasis and text (`[a:b:0.5]` is the text `a:b:0.5` at 1/1.1).
//! - Textual-inversion embeddings are not looked up: their names are ordinary words.

/// How a request's prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PromptSyntax {
    /// The text is tokenized as written (diffusers' behaviour; long prompts in 75-token chunks).
    #[default]
    Plain,
    /// AUTOMATIC1111's syntax: emphasis, `BREAK`, extra-network tags removed, comma backtrack
    /// at chunk boundaries, and the weights applied to the text encoder's output.
    A1111,
}

/// A piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Text with its emphasis multiplier (1.0 is none).
    Text { text: String, weight: f64 },
    /// `BREAK`: the tokens after it start a new chunk.
    Break,
}

impl Segment {
    pub fn text(text: &str, weight: f64) -> Self {
        Segment::Text {
            text: text.into(),
            weight,
        }
    }
}

/// An extra-network tag, `<kind:arg:arg…>`, as A1111 reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraNetworkTag {
    /// `lora`, `hypernet`, `lyco`, …
    pub kind: String,
    /// The text after the kind, split at `:` (`["name", "0.7"]`).
    pub args: Vec<String>,
    /// The tag as written, `<lora:name:0.7>`.
    pub text: String,
}

impl ExtraNetworkTag {
    /// The network's name (the first argument).
    pub fn name(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or("")
    }

    /// The multiplier (the second argument) if it is a number.
    pub fn multiplier(&self) -> Option<f64> {
        self.args.get(1).and_then(|s| s.trim().parse().ok())
    }
}

/// A prompt in A1111 syntax: its segments and the tags removed from it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub segments: Vec<Segment>,
    pub ignored_tags: Vec<ExtraNetworkTag>,
}

/// A (positive) prompt: extra-network tags removed ([`strip_extra_networks`]), then the rest
/// parsed ([`parse_attention`]).
pub fn parse(text: &str) -> Parsed {
    let (rest, ignored_tags) = strip_extra_networks(text);
    Parsed {
        segments: parse_attention(&rest),
        ignored_tags,
    }
}

/// Python's `\w` for `str` patterns (near enough: Unicode letters and digits, and `_`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Removes every `<kind:args>` (kind: one or more word characters; args: one or more
/// characters up to the next `>`), left to right, as A1111's `extra_networks.parse_prompt`.
/// Returns the text without them and the tags in order.
pub fn strip_extra_networks(text: &str) -> (String, Vec<ExtraNetworkTag>) {
    let mut out = String::with_capacity(text.len());
    let mut tags = Vec::new();
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let after = &rest[lt + 1..];
        let kind_len: usize = after
            .chars()
            .take_while(|&c| is_word(c))
            .map(char::len_utf8)
            .sum();
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| {
                let args = &after[kind_len + 1..];
                args.find('>')
                    .filter(|&gt| gt > 0)
                    .map(|gt| (&after[..kind_len], &args[..gt], kind_len + 1 + gt + 1))
            })
            .flatten();
        match tag {
            Some((kind, args, len)) => {
                tags.push(ExtraNetworkTag {
                    kind: kind.into(),
                    args: args.split(':').map(String::from).collect(),
                    text: rest[lt..lt + 1 + len].into(),
                });
                rest = &rest[lt + 1 + len..];
            }
            None => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

/// One lexical token of the emphasis grammar.
#[derive(Debug, PartialEq)]
enum Lexeme<'a> {
    /// `\(` `\)` `\[` `\]` `\\`: the character; a lone `\`: nothing.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:<number>)`: the whole lexeme and the number's text.
    Weight(&'a str, &'a str),
    CloseRound,
    CloseSquare,
    /// A run of anything else, or a `:` that starts no weight.
    Text(&'a str),
}

const SPECIAL: [char; 6] = ['\\', '(', ')', '[', ']', ':'];

/// The next lexeme of `s` (not empty) and its length in bytes.
fn lex(s: &str) -> (Lexeme<'_>, usize) {
    let mut chars = s.chars();
    let c = chars.next().expect("not empty");
    match c {
        '\\' => match chars.next() {
            Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Lexeme::Escaped(&s[1..1 + e.len_utf8()]), 2)
            }
            _ => (Lexeme::Escaped(""), 1),
        },
        '(' => (Lexeme::OpenRound, 1),
        '[' => (Lexeme::OpenSquare, 1),
        ')' => (Lexeme::CloseRound, 1),
        ']' => (Lexeme::CloseSquare, 1),
        ':' => {
            let body = &s[1..];
            let sign = usize::from(body.starts_with(['+', '-']));
            let digits = body[sign..]
                .bytes()
                .take_while(|b| b.is_ascii_digit() || *b == b'.')
                .count();
            let end = sign + digits;
            if digits > 0 && body[end..].starts_with(')') {
                (Lexeme::Weight(&s[..end + 2], &body[..end]), end + 2)
            } else {
                (Lexeme::Text(":"), 1)
            }
        }
        _ => {
            let n = s.find(SPECIAL).unwrap_or(s.len());
            (Lexeme::Text(&s[..n]), n)
        }
    }
}

/// The next `BREAK` of `s` at or after `from` as A1111's `\s*\bBREAK\b\s*`: (start, end) in
/// bytes, white space on both sides included.
fn find_break(s: &str, from: usize) -> Option<(usize, usize)> {
    let mut at = from;
    while let Some(k) = s[at..].find("BREAK").map(|k| k + at) {
        let before = s[..k].chars().next_back();
        let after = s[k + 5..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            let start = s[from..k]
                .char_indices()
                .rev()
                .take_while(|(_, c)| c.is_whitespace())
                .last()
                .map_or(k, |(i, _)| from + i);
            let end = k
                + 5
                + s[k + 5..]
                    .chars()
                    .take_while(|c| c.is_whitespace())
                    .map(char::len_utf8)
                    .sum::<usize>();
            return Some((start, end));
        }
        at = k + 1;
    }
    None
}

/// A1111's `parse_prompt_attention`, with the differences listed in the module docs: the text
/// (extra-network tags already removed) as runs of text with their weights and `BREAK`s.
/// Empty runs are left out; an empty prompt gives no segments.
pub fn parse_attention(text: &str) -> Vec<Segment> {
    // Weights are multiplied in A1111's order (each bracket as it closes, then the open ones)
    // so that they are the same f64 values, which decides which runs merge.
    const ROUND: f64 = 1.1;
    const SQUARE: f64 = 1.0 / 1.1;
    let mut res: Vec<(String, Option<f64>)> = Vec::new(); // None: BREAK
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, Option<f64>)>, from: usize, m: f64| {
        for (_, w) in &mut res[from..] {
            if let Some(w) = w {
                *w *= m;
            }
        }
    };
    let push_text = |res: &mut Vec<(String, Option<f64>)>, t: &str| {
        let mut from = 0;
        while let Some((start, end)) = find_break(t, from) {
            res.push((t[from..start].into(), Some(1.0)));
            res.push((String::new(), None));
            from = end;
        }
        res.push((t[from..].into(), Some(1.0)));
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (lexeme, len) = lex(rest);
        match lexeme {
            Lexeme::Escaped(c) => res.push((c.into(), Some(1.0))),
            Lexeme::OpenRound => round.push(res.len()),
            Lexeme::OpenSquare => square.push(res.len()),
            Lexeme::Weight(all, number) => match (round.last(), number.parse::<f64>()) {
                (Some(_), Ok(w)) => {
                    let from = round.pop().expect("an open bracket");
                    multiply(&mut res, from, w);
                }
                (Some(_), Err(_)) => {
                    // Not a number: the text, then the `)` as a closing bracket.
                    push_text(&mut res, &all[..all.len() - 1]);
                    let from = round.pop().expect("an open bracket");
                    multiply(&mut res, from, ROUND);
                }
                (None, _) => push_text(&mut res, all),
            },
            Lexeme::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("an open bracket");
                multiply(&mut res, from, ROUND);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("an open bracket");
                multiply(&mut res, from, SQUARE);
            }
            Lexeme::CloseRound => push_text(&mut res, ")"),
            Lexeme::CloseSquare => push_text(&mut res, "]"),
            Lexeme::Text(t) => push_text(&mut res, t),
        }
        rest = &rest[len..];
    }
    for &from in &round {
        multiply(&mut res, from, ROUND);
    }
    for &from in &square {
        multiply(&mut res, from, SQUARE);
    }
    // Merge runs of equal weights (empty runs included, as A1111 does), then drop the empty
    // ones, which tokenize to nothing.
    let mut merged: Vec<(String, Option<f64>)> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some((last, Some(lw))) if w == Some(*lw) => last.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
        .into_iter()
        .filter_map(|(text, w)| match w {
            None => Some(Segment::Break),
            Some(_) if text.is_empty() => None,
            Some(weight) => Some(Segment::Text { text, weight }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str, weight: f64) -> Segment {
        Segment::text(text, weight)
    }

    /// Weights compared to 1e-12 (the docstring's values are Python's f64 products).
    fn check(input: &str, expected: &[Segment]) {
        let got = parse_attention(input);
        let same = got.len() == expected.len()
            && got.iter().zip(expected).all(|(g, e)| match (g, e) {
                (
                    Segment::Text { text, weight },
                    Segment::Text {
                        text: et,
                        weight: ew,
                    },
                ) => text == et && (weight - ew).abs() < 1e-12,
                (Segment::Break, Segment::Break) => true,
                _ => false,
            });
        assert!(same, "{input:?}:\n got {got:?}\nwant {expected:?}");
    }

    #[test]
    fn the_docstring_examples() {
        check("normal text", &[t("normal text", 1.0)]);
        check(
            "an (important) word",
            &[t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
        );
        check("(unbalanced", &[t("unbalanced", 1.1)]);
        check(r"\(literal\]", &[t("(literal]", 1.0)]);
        check("(unnecessary)(parens)", &[t("unnecessaryparens", 1.1)]);
        check(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ],
        );
    }

    #[test]
    fn weights_are_python_products_exactly() {
        // What Python prints for the docstring example, bit for bit.
        let got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let w = |i: usize| match &got[i] {
            Segment::Text { weight, .. } => *weight,
            Segment::Break => panic!(),
        };
        assert_eq!(w(1), 1.5730000000000004);
        assert_eq!(w(7), 1.4641000000000006);
        assert_eq!(w(5), 0.55);
    }

    #[test]
    fn table() {
        let s = 1.0 / 1.1;
        let cases: Vec<(&str, Vec<Segment>)> = vec![
            ("", vec![]),
            ("((a))", vec![t("a", 1.1 * 1.1)]),
            ("[a]", vec![t("a", s)]),
            ("[[a]]", vec![t("a", s * s)]),
            ("([a])", vec![t("a", s * 1.1)]),
            (
                "(a [b] c)",
                vec![t("a ", 1.1), t("b", s * 1.1), t(" c", 1.1)],
            ),
            ("(a:1.5)", vec![t("a", 1.5)]),
            ("(a:-0.5) b", vec![t("a", -0.5), t(" b", 1.0)]),
            ("(a:.5)", vec![t("a", 0.5)]),
            ("(a:+2.)", vec![t("a", 2.0)]),
            ("((a:1.5))", vec![t("a", 1.5 * 1.1)]),
            (
                "(a (b:2) c:0.5)",
                vec![t("a ", 0.5), t("b", 1.0), t(" c", 0.5)],
            ),
            ("[a:1.5]", vec![t("a:1.5", s)]),
            ("(a:1.5]", vec![t("a:1.5]", 1.1)]),
            ("a:b", vec![t("a:b", 1.0)]),
            ("a: b", vec![t("a: b", 1.0)]),
            ("(a: b:1.2)", vec![t("a: b", 1.2)]),
            ("a:1.2) b", vec![t("a:1.2) b", 1.0)]),
            // Unbalanced: stray closers are text; unclosed openers run to the end.
            ("a) b]", vec![t("a) b]", 1.0)]),
            ("a (b", vec![t("a ", 1.0), t("b", 1.1)]),
            ("a [b", vec![t("a ", 1.0), t("b", s)]),
            ("((a) b", vec![t("a", 1.1 * 1.1), t(" b", 1.1)]),
            ("[(a", vec![t("a", 1.1 * s)]),
            ("(a]", vec![t("a]", 1.1)]),
            ("[a)", vec![t("a)", s)]),
            // Escapes; a backslash before anything else disappears.
            (r"\(a\)", vec![t("(a)", 1.0)]),
            (r"\[a\]", vec![t("[a]", 1.0)]),
            (r"a\\b", vec![t(r"a\b", 1.0)]),
            (r"a\b", vec![t("ab", 1.0)]),
            (r"(\(a\))", vec![t("(a)", 1.1)]),
            (r"\\(a)", vec![t(r"\", 1.0), t("a", 1.1)]),
            (r"a\", vec![t("a", 1.0)]),
            (r"(a)\(b)", vec![t("a", 1.1), t("(b)", 1.0)]),
            (r"(a)\\(b)", vec![t("a", 1.1), t(r"\", 1.0), t("b", 1.1)]),
            // Merging.
            ("(a)(b) c", vec![t("ab", 1.1), t(" c", 1.0)]),
            ("(a:1.1)(b)", vec![t("ab", 1.1)]),
            ("((a)) ((b))", vec![t("a", 1.21), t(" ", 1.0), t("b", 1.21)]),
            // BREAK.
            ("a BREAK b", vec![t("a", 1.0), Segment::Break, t("b", 1.0)]),
            (
                "a  BREAK\n b",
                vec![t("a", 1.0), Segment::Break, t("b", 1.0)],
            ),
            ("BREAK b", vec![Segment::Break, t("b", 1.0)]),
            ("a BREAK", vec![t("a", 1.0), Segment::Break]),
            (
                "a BREAK BREAK b",
                vec![t("a", 1.0), Segment::Break, Segment::Break, t("b", 1.0)],
            ),
            (
                "a,BREAK,b",
                vec![t("a,", 1.0), Segment::Break, t(",b", 1.0)],
            ),
            ("a break b", vec![t("a break b", 1.0)]),
            ("aBREAK b", vec![t("aBREAK b", 1.0)]),
            ("BREAKfast", vec![t("BREAKfast", 1.0)]),
            ("a_BREAK b", vec![t("a_BREAK b", 1.0)]),
            ("a BREAK2", vec![t("a BREAK2", 1.0)]),
            (
                "(a) BREAK (b)",
                vec![t("a", 1.1), Segment::Break, t("b", 1.1)],
            ),
            ("a BREAK:1", vec![t("a", 1.0), Segment::Break, t(":1", 1.0)]),
            // Inside brackets (differs from A1111, see the module docs).
            (
                "(a BREAK b)",
                vec![t("a", 1.1), Segment::Break, t("b", 1.1)],
            ),
            // A weight that is not a number (A1111 fails).
            ("(a:1.2.3)", vec![t("a:1.2.3", 1.1)]),
            ("(a:.)", vec![t("a:.", 1.1)]),
            // Prompt editing is not parsed.
            ("[a:b:0.5]", vec![t("a:b:0.5", s)]),
            ("[a|b]", vec![t("a|b", s)]),
            ("é (ü) 猫", vec![t("é ", 1.0), t("ü", 1.1), t(" 猫", 1.0)]),
        ];
        for (input, expected) in cases {
            check(input, &expected);
        }
    }

    #[test]
    fn extra_network_tags() {
        let p = parse("a cat <lora:cute_style:0.7>, (fluffy) <hypernet:h1:1>");
        assert_eq!(
            p.segments,
            [t("a cat , ", 1.0), t("fluffy", 1.1), t(" ", 1.0)]
        );
        assert_eq!(p.ignored_tags.len(), 2);
        let lora = &p.ignored_tags[0];
        assert_eq!((lora.kind.as_str(), lora.name()), ("lora", "cute_style"));
        assert_eq!(lora.args, ["cute_style", "0.7"]);
        assert_eq!(lora.multiplier(), Some(0.7));
        assert_eq!(lora.text, "<lora:cute_style:0.7>");
        assert_eq!(p.ignored_tags[1].kind, "hypernet");
        assert_eq!(p.ignored_tags[1].multiplier(), Some(1.0));

        let strip = |s: &str| {
            let (text, tags) = strip_extra_networks(s);
            (text, tags.into_iter().map(|t| t.text).collect::<Vec<_>>())
        };
        assert_eq!(strip("<lora:x>"), ("".into(), vec!["<lora:x>".into()]));
        // Not tags: no kind, a kind with a non-word character, no arguments, no `>`.
        for s in [
            "<:x>",
            "<lo ra:x>",
            "<lora:>",
            "<lora:x",
            "a < b",
            "<>",
            "<lora>",
        ] {
            assert_eq!(strip(s), (s.into(), vec![]), "{s}");
        }
        // Arguments run to the first `>`, whatever they hold.
        assert_eq!(
            strip("<lora:a<lora:b:1>c>"),
            ("c>".into(), vec!["<lora:a<lora:b:1>".into()])
        );
        assert_eq!(
            strip("x <<lora:a:1>> (y)"),
            ("x <> (y)".into(), vec!["<lora:a:1>".into()])
        );
        // Tags inside brackets go; the brackets stay.
        assert_eq!(parse("(a <lora:x:1>)").segments, [t("a ", 1.1)],);
        assert_eq!(parse("<lora:x:1>").segments, []);
    }

    mod chunks {
        use super::super::*;
        use crate::tokenizer::{
            ClipTokenizer, Family, WeightedChunk, CHUNK_TOKENS, COMMA_BACKTRACK, CONTEXT_LENGTH,
        };

        const BOS: u32 = 49406;
        const EOS: u32 = 49407;

        fn tok() -> ClipTokenizer {
            ClipTokenizer::embedded(Family::Sd1).unwrap()
        }

        fn chunks(tok: &ClipTokenizer, prompt: &str) -> Vec<WeightedChunk> {
            tok.encode_weighted_chunks(&parse(prompt).segments).unwrap()
        }

        /// The prompt tokens of a chunk (between bos and eos) with their weights, checking the
        /// frame: bos, eos, padding, weight 1 outside the tokens.
        fn body(c: &WeightedChunk) -> Vec<(u32, f32)> {
            assert_eq!(c.tokens[0], BOS);
            assert_eq!(c.weights[0], 1.0);
            let n = c.tokens[1..].iter().position(|&t| t == EOS).unwrap();
            assert!(
                c.tokens[n + 1..].iter().all(|&t| t == EOS),
                "{:?}",
                c.tokens
            );
            assert!(c.weights[n + 1..].iter().all(|&w| w == 1.0));
            (1..=n).map(|i| (c.tokens[i], c.weights[i])).collect()
        }

        fn id(tok: &ClipTokenizer, word: &str) -> u32 {
            let ids = tok.encode(word).unwrap();
            assert_eq!(ids.len(), 1, "{word}");
            ids[0]
        }

        #[test]
        fn token_weights_and_breaks() {
            let tok = tok();
            let (a, cat, dog) = (id(&tok, "a"), id(&tok, "cat"), id(&tok, "dog"));
            let c = chunks(&tok, "a (cat:1.5) BREAK [dog]");
            assert_eq!(c.len(), 2);
            assert_eq!(body(&c[0]), [(a, 1.0), (cat, 1.5)]);
            assert_eq!(body(&c[1]), [(dog, (1.0 / 1.1) as f32)]);
            // Weights are f64 products rounded once to f32, as torch.asarray does.
            let c = chunks(&tok, "((cat))");
            assert_eq!(body(&c[0]), [(cat, (1.1f64 * 1.1) as f32)]);

            // BREAK first makes an empty chunk; BREAK last adds none.
            let c = chunks(&tok, "BREAK a");
            assert_eq!(c.len(), 2);
            assert_eq!(c[0], tok.empty_weighted_chunk());
            assert_eq!(body(&c[1]), [(a, 1.0)]);
            assert_eq!(chunks(&tok, "a BREAK").len(), 1);
            assert_eq!(chunks(&tok, "a BREAK BREAK b").len(), 3);
            assert_eq!(chunks(&tok, ""), [tok.empty_weighted_chunk()]);
            assert_eq!(chunks(&tok, "<lora:x:1>"), [tok.empty_weighted_chunk()]);
            assert_eq!(tok.empty_weighted_chunk().tokens, tok.empty_chunk());
        }

        #[test]
        fn without_syntax_the_tokens_are_the_plain_ones() {
            let tok = tok();
            for prompt in [
                "a photo of a cat",
                &vec!["a"; 160].join(" "),
                "best quality, a red cube on a wooden table, studio light",
            ] {
                let weighted = chunks(&tok, prompt);
                let plain = tok.encode_chunks(prompt).unwrap();
                let tokens: Vec<_> = weighted.iter().map(|c| c.tokens).collect();
                assert_eq!(tokens, plain, "{prompt}");
                assert!(weighted.iter().all(|c| c.weights == [1.0; CONTEXT_LENGTH]));
            }
        }

        /// `n_a` × "a", a comma, `n_b` × "b" at weight 1.3: (tokens per chunk).
        fn comma_case(tok: &ClipTokenizer, n_a: usize, n_b: usize) -> Vec<Vec<(u32, f32)>> {
            let prompt = format!(
                "{}, ({}:1.3)",
                vec!["a"; n_a].join(" "),
                vec!["b"; n_b].join(" ")
            );
            chunks(tok, &prompt).iter().map(body).collect()
        }

        #[test]
        fn a_chunk_boundary_near_a_comma_moves_back_to_it() {
            let tok = tok();
            let (a, b, comma) = (id(&tok, "a"), id(&tok, "b"), tok.comma_id().unwrap());
            assert_eq!(comma, id(&tok, ","));
            let run = |t: u32, w: f32, n: usize| vec![(t, w); n];
            let cat = |parts: &[Vec<(u32, f32)>]| parts.concat();

            // Comma 5 tokens from the end: the 4 "b" after it move to the next chunk, weights
            // with them.
            let c = comma_case(&tok, 70, 10);
            assert_eq!(c.len(), 2);
            assert_eq!(c[0], cat(&[run(a, 1.0, 70), vec![(comma, 1.0)]]));
            assert_eq!(c[1], run(b, 1.3, 10));

            // Exactly COMMA_BACKTRACK tokens from the end: still moved.
            let n_a = CHUNK_TOKENS - COMMA_BACKTRACK;
            let c = comma_case(&tok, n_a, 30);
            assert_eq!(c[0], cat(&[run(a, 1.0, n_a), vec![(comma, 1.0)]]));
            assert_eq!(c[1], run(b, 1.3, 30));

            // One further: cut at 75 as without commas.
            let n_a = CHUNK_TOKENS - COMMA_BACKTRACK - 1;
            let c = comma_case(&tok, n_a, 30);
            assert_eq!(c[0].len(), CHUNK_TOKENS);
            assert_eq!(c[1], run(b, 1.3, 30 - (CHUNK_TOKENS - n_a - 1)));

            // A comma as the last token of a full chunk: nothing to move.
            let c = comma_case(&tok, 74, 3);
            assert_eq!(c[0], cat(&[run(a, 1.0, 74), vec![(comma, 1.0)]]));
            assert_eq!(c[1], run(b, 1.3, 3));

            // A comma that opens a chunk is forgotten: the next chunk is cut at 75.
            let c = comma_case(&tok, 75, 80);
            assert_eq!(c.len(), 3);
            assert_eq!(c[0], run(a, 1.0, 75));
            assert_eq!(c[1], cat(&[vec![(comma, 1.0)], run(b, 1.3, 74)]));
            assert_eq!(c[2], run(b, 1.3, 6));

            // Only the last comma counts, and a BREAK forgets it.
            let prompt = format!(
                "{}, a, {}",
                vec!["a"; 60].join(" "),
                vec!["b"; 20].join(" ")
            );
            let c: Vec<_> = chunks(&tok, &prompt).iter().map(body).collect();
            assert_eq!(c[0].len(), 63);
            assert_eq!(c[1], run(b, 1.0, 20));
            let prompt = format!(
                "{}, BREAK {}",
                vec!["a"; 60].join(" "),
                vec!["a"; 76].join(" ")
            );
            let c: Vec<_> = chunks(&tok, &prompt).iter().map(body).collect();
            assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), [61, 75, 1]);

            // Without A1111's syntax the plain path cuts at 75 regardless.
            let plain = tok
                .encode_chunks(&format!("{}, {}", ["a"; 70].join(" "), ["b"; 10].join(" ")))
                .unwrap();
            assert_eq!(plain[0][CHUNK_TOKENS], b);
        }

        #[test]
        fn the_pair_is_padded_with_empty_chunks() {
            let tok = tok();
            let (p, n) = tok
                .encode_pair_weighted(&parse("a BREAK b BREAK c").segments, &[])
                .unwrap();
            assert_eq!((p.len(), n.len()), (3, 3));
            assert!(n.iter().all(|c| *c == tok.empty_weighted_chunk()));
        }
    }
}
