//! The prompt of a request as the parse left it: views into the body's
//! text (copied only where the JSON escaped it), for the token estimate and
//! for prefix affinity's block keys.

use std::borrow::Cow;

/// A piece of prompt text.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece<'a> {
    /// A string.
    Text(Cow<'a, str>),
    /// A token id, as written.
    Token(Cow<'a, str>),
    /// An array of pieces.
    Many(Vec<Piece<'a>>),
    /// Something that carries no text (an image part, a boolean).
    Nothing,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<'a> {
    /// Its role.
    pub role: Cow<'a, str>,
    /// Its content's text parts.
    pub parts: Vec<Piece<'a>>,
}

/// The prompt of a request: chat messages, and text from the endpoint's
/// other prompt-carrying fields (a completion prompt, an embedding or
/// response input, a system prompt, a rerank query and its documents).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prompt<'a> {
    /// Text pieces, in the order their fields came.
    pub pieces: Vec<Piece<'a>>,
    /// Chat messages.
    pub messages: Vec<Message<'a>>,
}

/// Bytes a message's role markers and separators stand for in the estimate.
const MESSAGE_OVERHEAD: u64 = 16;
/// Bytes a token id stands for in the estimate (about one token).
const TOKEN_BYTES: u64 = 4;

impl Piece<'_> {
    /// Bytes of text, token ids counted as one token's worth.
    pub fn text_bytes(&self) -> u64 {
        match self {
            Piece::Text(s) => s.len() as u64,
            Piece::Token(_) => TOKEN_BYTES,
            Piece::Many(pieces) => pieces.iter().map(Piece::text_bytes).sum(),
            Piece::Nothing => 0,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Piece::Text(s) | Piece::Token(s) => out.extend_from_slice(s.as_bytes()),
            Piece::Many(pieces) => pieces.iter().for_each(|p| p.write(out)),
            Piece::Nothing => {}
        }
    }
}

impl Prompt<'_> {
    /// Bytes the prompt stands for, for the token estimate.
    pub fn text_bytes(&self) -> u64 {
        let pieces: u64 = self.pieces.iter().map(Piece::text_bytes).sum();
        let messages: u64 = self
            .messages
            .iter()
            .map(|m| m.parts.iter().map(Piece::text_bytes).sum::<u64>() + MESSAGE_OVERHEAD)
            .sum();
        pieces + messages
    }

    /// The prompt as one byte string, for prefix affinity: the text pieces,
    /// then each message's role and text in order.
    pub fn text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text_bytes() as usize);
        self.pieces.iter().for_each(|p| p.write(&mut out));
        for message in &self.messages {
            out.extend_from_slice(message.role.as_bytes());
            out.extend_from_slice(b": ");
            message.parts.iter().for_each(|p| p.write(&mut out));
            out.push(b'\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_text_names_each_role_and_counts_overhead() {
        let prompt = Prompt {
            pieces: vec![],
            messages: vec![
                Message {
                    role: "system".into(),
                    parts: vec![Piece::Text("be brief".into())],
                },
                Message {
                    role: "user".into(),
                    parts: vec![Piece::Text("hi".into()), Piece::Nothing],
                },
            ],
        };
        assert_eq!(prompt.text(), b"system: be brief\nuser: hi\n");
        assert_eq!(prompt.text_bytes(), 8 + 16 + 2 + 16);
    }

    #[test]
    fn token_ids_count_as_a_token_and_keep_their_digits() {
        let prompt = Prompt {
            pieces: vec![Piece::Many(vec![
                Piece::Token("101".into()),
                Piece::Token("7".into()),
            ])],
            messages: vec![],
        };
        assert_eq!(prompt.text(), b"1017");
        assert_eq!(prompt.text_bytes(), 8);
    }
}
