//! Generated OpenAI/vLLM streams, cut anywhere: the client must receive exactly the stream the
//! server would have sent without the injected options, and the tracker the server's figures.
#![no_main]

use arbitrary::Arbitrary;
use flyball_filter_core::fuzzing::{EventSpec, StreamStyle, sse_structured};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Event {
    Role,
    Content {
        text: String,
        continuous: Option<(u16, u16)>,
    },
    Reasoning(String),
    ToolCall(String),
    Finish,
    Usage {
        prompt: u32,
        completion: u32,
    },
    Comment(String),
    Done,
}

#[derive(Debug, Arbitrary)]
struct Input {
    events: Vec<Event>,
    eol: u8,
    space: bool,
    usage_null: bool,
    completions: bool,
    sizes: Vec<u8>,
}

impl From<Event> for EventSpec {
    fn from(event: Event) -> Self {
        match event {
            Event::Role => EventSpec::Role,
            Event::Content { text, continuous } => EventSpec::Content {
                text,
                continuous: continuous.map(|(p, c)| (u64::from(p), u64::from(c))),
            },
            Event::Reasoning(text) => EventSpec::Reasoning(text),
            Event::ToolCall(args) => EventSpec::ToolCall(args),
            Event::Finish => EventSpec::Finish,
            Event::Usage { prompt, completion } => EventSpec::Usage {
                prompt: u64::from(prompt),
                completion: u64::from(completion),
            },
            Event::Comment(text) => EventSpec::Comment(text),
            Event::Done => EventSpec::Done,
        }
    }
}

fuzz_target!(|input: Input| {
    let events: Vec<EventSpec> = input.events.into_iter().take(64).map(Into::into).collect();
    let style = StreamStyle {
        eol: input.eol,
        space: input.space,
        usage_null: input.usage_null,
        completions: input.completions,
    };
    sse_structured(&events, style, &input.sizes);
});
