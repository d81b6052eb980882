//! Teacher-forced scoring agrees with greedy generation on real cases of the default model, correct
//! and incorrect ones, and the induction probe behaves as a copy test should.

mod common;
use anyhow::Result;
use common::*;
use recurformer::eval::tasks::*;
use recurformer::formats::tokenizer::Tokenizer;
use recurformer::model::generate::{generate, GenerateRequest, Sampler, SamplingParams};
use recurformer::model::llama::Model;

/// Greedy generation of `n` tokens (no stop token: the comparison wants exactly n).
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingParams::default())?;
    let (out, _) = generate(
        model,
        &GenerateRequest {
            prompt,
            max_tokens: n,
            eos: &[],
        },
        &mut sampler,
        &mut |_| Ok(()),
    )?;
    Ok(out)
}

/// Scores one case both ways and checks that they agree; returns (teacher-forced correct, seconds
/// teacher-forced, seconds generating).
fn agree(
    model: &Model,
    tok: &Tokenizer,
    what: &str,
    prompt: &[u32],
    text: &str,
    add_special: bool,
    continuation: &str,
) -> Result<(bool, f64, f64)> {
    let answer = continuation_ids(tok, text, prompt, add_special, continuation)?;
    // The answer ids are the in-context tokenisation: decoding them gives the continuation back.
    assert_eq!(tok.decode(&answer, false)?, continuation, "{what}");
    let tf = teacher_forced(model, tok, prompt, &answer)?;
    let t0 = std::time::Instant::now();
    let gen = greedy(model, prompt, answer.len() + 1)?;
    let gen_secs = t0.elapsed().as_secs_f64();
    let n = answer.len();
    let ends = !tok
        .decode(&gen[n..], false)?
        .starts_with(|c: char| c.is_ascii_alphanumeric());
    let gen_correct = gen[..n] == answer[..] && ends;
    println!(
        "{what}: answer {continuation:?} -> teacher-forced {:?} ({}; {}/{} digits, log-prob {:.3}, \
         {:.2} s), generated {:?} ({gen_secs:.2} s)",
        tok.decode(&tf.predicted, false)?,
        tf.correct,
        tf.content_correct,
        tf.content_tokens,
        tf.mean_logprob,
        tf.secs,
        tok.decode(&gen, false)?
    );
    assert_eq!(tf.correct, gen_correct, "{what}");
    // Up to and including the first wrong token, teacher forcing sees what generation wrote, so
    // the argmaxes are the same tokens.
    let k = (0..n).find(|&i| gen[i] != answer[i]).unwrap_or(n);
    assert_eq!(tf.predicted[..=k], gen[..=k], "{what}");
    assert_eq!(tf.predicted.len(), n + 1);
    assert!(tf.mean_logprob <= 0.0 && tf.mean_logprob.is_finite());
    if tf.correct {
        assert_eq!(tf.content_correct, tf.content_tokens, "{what}");
    }
    Ok((tf.correct, tf.secs, gen_secs))
}

#[test]
fn teacher_forced_equals_greedy_generation_on_real_cases() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let tok = loaded.tokenizer()?;
    let hay = Haystack::paul_graham()?;
    let mut outcomes = Vec::new();
    // The base model on short needles (it finds most) and on 1-hop HashHop (it misses most).
    let needle = |model: &Model, len: usize, depth: f64, seed: u64, chat: bool| -> Result<bool> {
        let c = needle_prompt(
            tok,
            &hay,
            &NeedleParams {
                context_tokens: len,
                depth,
                seed,
                chat,
            },
        )?;
        let what = format!("needle {len} depth {depth} seed {seed} chat {chat}");
        Ok(agree(
            model,
            tok,
            &what,
            &c.prompt,
            &c.text,
            !chat,
            &format!(" {}", c.value),
        )?
        .0)
    };
    for (depth, seed) in [(0.0, 1), (0.5, 2), (1.0, 3)] {
        outcomes.push(needle(&loaded.model, 256, depth, seed, true)?);
    }
    outcomes.push(needle(&loaded.model, 300, 0.5, 4, false)?);
    for (hops, seed) in [(1, 5), (1, 6), (2, 7)] {
        let c = hashhop_case(
            tok,
            &HashHopParams {
                context_tokens: 320,
                hops,
                seed,
                chat: true,
                hash_len: 8,
            },
        )?;
        let cont = format!(" {}", c.chain[1..].join(" = "));
        let what = format!("hashhop 320 hops {hops} seed {seed}");
        outcomes.push(agree(&loaded.model, tok, &what, &c.prompt, &c.text, false, &cont)?.0);
    }
    // A corrupted model: the base with the value projections of layers 12..24 zeroed (their
    // attention writes nothing), which breaks copying the needle (the induction heads of this
    // model sit in layers 17-24, issue 18).
    let mut broken = loaded.model.clone();
    for l in &mut broken.layers[12..24] {
        let a = l.self_attn.as_mut().expect("a base model keeps attention");
        a.v_proj.weight = a.v_proj.weight.zeros_like()?;
    }
    for (depth, seed) in [(0.5, 2), (1.0, 3)] {
        outcomes.push(needle(&broken, 256, depth, seed, true)?);
    }
    let right = outcomes.iter().filter(|&&c| c).count();
    println!("{right} of {} cases correct", outcomes.len());
    assert!(
        right > 0 && right < outcomes.len(),
        "need correct and incorrect cases to compare: {outcomes:?}"
    );
    Ok(())
}

/// The induction probe: a real model copies random spans far above chance and better with each
/// repeat; the corrupted model copies less; sequences are deterministic and their spans repeat.
#[test]
fn induction_probe_on_the_default_model() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let tok = loaded.tokenizer()?;
    let pool = induction_token_pool(tok, loaded.model.cfg.vocab_size)?;
    let cfg = InductionConfig {
        sequences: 3,
        span: 32,
        repeats: 4,
        seed: 7,
    };
    // No special token in the pool; sequences repeat one span of distinct ids.
    for id in [pool[0], pool[pool.len() / 2], pool[pool.len() - 1]] {
        let piece = tok.decode(&[id], false)?;
        assert_eq!(tok.decode(&[id], true)?, piece, "id {id} is special");
    }
    let bos = tok.encode("", true)?;
    let ids = induction_sequence(&pool, &bos, &cfg, 1);
    assert_eq!(ids.len(), bos.len() + 4 * 32);
    let span = &ids[bos.len()..bos.len() + 32];
    assert_eq!(
        span.iter().collect::<std::collections::HashSet<_>>().len(),
        32
    );
    for r in 1..4 {
        assert_eq!(&ids[bos.len() + r * 32..bos.len() + (r + 1) * 32], span);
    }
    assert_eq!(ids, induction_sequence(&pool, &bos, &cfg, 1));
    assert_ne!(ids, induction_sequence(&pool, &bos, &cfg, 2));

    let t0 = std::time::Instant::now();
    let r = run_induction(&loaded.model, tok, &cfg, &mut |_| {})?;
    println!(
        "induction on the base: {:?} overall {:.3} [{:.3}, {:.3}] in {:.1} s; pool {}..={} ({})",
        r.per_repeat.iter().map(|p| p.rate).collect::<Vec<_>>(),
        r.overall.rate,
        r.overall.low,
        r.overall.high,
        t0.elapsed().as_secs_f64(),
        r.pool_first,
        r.pool_last,
        r.pool_size
    );
    assert_eq!(r.per_repeat.len(), 3);
    assert_eq!(r.overall.trials, 3 * 3 * 31);
    assert_eq!(r.per_sequence.len(), 3);
    // Chance is 1 / 20,000; a working copy circuit gets most of them.
    assert!(r.overall.rate > 0.5, "{:?}", r.overall);
    assert!(r.per_repeat[2].rate >= r.per_repeat[0].rate - 0.05);

    let mut broken = loaded.model.clone();
    for l in &mut broken.layers[12..24] {
        let a = l.self_attn.as_mut().expect("a base model keeps attention");
        a.v_proj.weight = a.v_proj.weight.zeros_like()?;
    }
    let b = run_induction(&broken, tok, &cfg, &mut |_| {})?;
    println!("induction, corrupted: overall {:.3}", b.overall.rate);
    assert!(b.overall.rate < r.overall.rate - 0.2, "{:?}", b.overall);
    Ok(())
}
