//! Tests of the mixer: the chunked scan against the reference scan, gradients against finite
//! differences, prefill state against stepwise decode, loading and state bytes.

use super::*;
// Test-only: the gradient test also covers a mixer initialised from attention (`convert::init`).
use crate::convert::init::AttnSource;
use anyhow::Context;
use candle_core::backprop::GradStore;

pub(crate) fn max_abs(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok((
        d.max_all()?.to_scalar::<f64>()?,
        d.mean_all()?.to_scalar::<f64>()?,
    ))
}

fn max_abs_val(a: &Tensor) -> Result<f64> {
    Ok(a.to_dtype(DType::F64)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?)
}

pub(crate) fn uni(
    shape: &[usize],
    lo: f64,
    hi: f64,
    rng: &mut rand::rngs::StdRng,
) -> Result<Tensor> {
    let len: usize = shape.iter().product();
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(lo..hi) as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Random scan inputs: (x, dt, a, b, c, d, h0).
struct RawInputs {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    h0: Tensor,
}

fn raw_inputs(bsz: usize, t: usize, n: usize, p: usize, ns: usize, seed: u64) -> Result<RawInputs> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok(RawInputs {
        x: uni(&[bsz, t, n, p], -1.0, 1.0, &mut rng)?,
        dt: uni(&[bsz, t, n], 0.01, 1.0, &mut rng)?,
        a: uni(&[n], -2.0, -0.05, &mut rng)?,
        b: uni(&[bsz, t, n, ns], -0.5, 0.5, &mut rng)?,
        c: uni(&[bsz, t, n, ns], -0.5, 0.5, &mut rng)?,
        d: uni(&[n], -1.0, 1.0, &mut rng)?,
        h0: uni(&[bsz, n, p, ns], -1.0, 1.0, &mut rng)?,
    })
}

fn tiny_cfg() -> MambaConfig {
    MambaConfig {
        n_groups: 2,
        group_size: 2,
        head_dim: 4,
        state_size: 3,
        conv_kernel: 4,
        d_model: 10,
    }
}

/// A random mixer whose parameters are all generic (D, z_bias, norm weight not constant).
fn tiny_mixer(seed: u64) -> Result<MambaMixer> {
    generic_mixer(&tiny_cfg(), seed)
}

/// [`tiny_mixer`] of any size.
fn generic_mixer(cfg: &MambaConfig, seed: u64) -> Result<MambaMixer> {
    let cfg = *cfg;
    let m = MambaMixer::init_random(&cfg, seed, &Device::Cpu)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let n = cfg.n_heads();
    let np = n * cfg.head_dim;
    let mut params: Vec<Tensor> = m.params().iter().map(|t| (*t).clone()).collect();
    params[6] = uni(&[n], -1.0, 1.0, &mut rng)?; // dt_bias: Δ around 0.3..1.3
    params[8] = uni(&[n], -1.0, 1.0, &mut rng)?; // D
    params[10] = uni(&[np], -0.5, 0.5, &mut rng)?; // z_bias
    params[11] = uni(&[np], 0.5, 1.5, &mut rng)?; // norm weight
    MambaMixer::from_params(&cfg, params)
}

#[test]
fn chunked_scan_matches_reference() -> Result<()> {
    let (bsz, n, p, ns) = (2, 3, 4, 5);
    let mut worst = 0f64;
    for &t in &[37usize, 16, 1] {
        let r = raw_inputs(bsz, t, n, p, ns, 7 + t as u64)?;
        for with_state in [false, true] {
            let inp = ScanInputs {
                x: &r.x,
                dt: &r.dt,
                a: &r.a,
                b: &r.b,
                c: &r.c,
                d: &r.d,
                h0: with_state.then_some(&r.h0),
            };
            let (y_ref, h_ref) = scan_reference(&inp)?;
            for &chunk in &[1usize, 3, 8, 64] {
                let (y, h) = scan_chunked(&inp, chunk)?;
                assert_eq!(y.dims(), y_ref.dims());
                let (ym, ya) = max_abs(&y, &y_ref)?;
                let (hm, ha) = max_abs(&h, &h_ref)?;
                println!(
                    "t={t:2} chunk={chunk:2} state={with_state:5}: y max {ym:.2e} mean {ya:.2e} \
                     (|y| max {:.2}), h max {hm:.2e} mean {ha:.2e}",
                    max_abs_val(&y_ref)?
                );
                worst = worst.max(ym).max(hm);
                assert!(
                    ym <= 1e-5 && hm <= 1e-5,
                    "t={t} chunk={chunk}: {ym:e} {hm:e}"
                );
            }
        }
    }
    println!("worst max abs error {worst:.2e}");
    Ok(())
}

/// The fused scan (`fused.rs`) against the reference: outputs and final state, and the gradients
/// of a loss on both with respect to every input, in f64 (where the two agree to rounding) and in
/// f32; lengths below, at and across the backward's checkpoint stretches.
#[test]
fn fused_scan_matches_reference_with_gradients() -> Result<()> {
    let (bsz, n, p, ns) = (2, 3, 20, 5); // 20 rows: two lanes of the fused op per head
    for &t in &[1usize, 32, 37, 70] {
        for dtype in [DType::F64, DType::F32] {
            let r = raw_inputs(bsz, t, n, p, ns, 40 + t as u64)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(41 + t as u64);
            let wy = uni(&[bsz, t, n, p], -1.0, 1.0, &mut rng)?.to_dtype(dtype)?;
            let wh = uni(&[bsz, n, p, ns], -1.0, 1.0, &mut rng)?.to_dtype(dtype)?;
            let vars: Vec<Var> = [&r.x, &r.dt, &r.a, &r.b, &r.c, &r.d]
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
                .collect::<candle_core::Result<_>>()?;
            let run = |fused: bool| -> Result<(Tensor, Tensor, GradStore)> {
                let inp = ScanInputs {
                    x: vars[0].as_tensor(),
                    dt: vars[1].as_tensor(),
                    a: vars[2].as_tensor(),
                    b: vars[3].as_tensor(),
                    c: vars[4].as_tensor(),
                    d: vars[5].as_tensor(),
                    h0: None,
                };
                let (y, h) = if fused {
                    fused::scan_fused(&inp)?
                } else {
                    scan_reference(&inp)?
                };
                let loss = ((&y * &wy)?.sum_all()? + (&h * &wh)?.sum_all()?)?;
                let g = loss.backward()?;
                Ok((y, h, g))
            };
            let (y_ref, h_ref, g_ref) = run(false)?;
            let (y, h, g) = run(true)?;
            assert_eq!(y.dims(), y_ref.dims());
            assert_eq!(h.dims(), h_ref.dims());
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            let (ym, _) = max_abs(&y, &y_ref)?;
            let (hm, _) = max_abs(&h, &h_ref)?;
            let (ry, rh) = (ym / max_abs_val(&y_ref)?, hm / max_abs_val(&h_ref)?);
            println!("t={t:2} {dtype:?}: y rel {ry:.2e}, h rel {rh:.2e}");
            assert!(
                ry <= tol && rh <= tol,
                "t={t} {dtype:?}: y {ry:e}, h {rh:e}"
            );
            for (name, v) in ["x", "dt", "A", "B", "C", "D"].iter().zip(&vars) {
                let a = g.get(v).context("no fused gradient")?;
                let b = g_ref.get(v).context("no reference gradient")?;
                let (m, _) = max_abs(a, b)?;
                let rel = m / max_abs_val(b)?.max(1e-300);
                println!("t={t:2} {dtype:?} d/d{name:2}: rel {rel:.2e}");
                assert!(
                    rel <= tol,
                    "t={t} {dtype:?} d/d{name}: relative error {rel:e}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn chunked_scan_gradients_match_reference() -> Result<()> {
    let (bsz, t, n, p, ns) = (2, 23, 3, 4, 5);
    let r = raw_inputs(bsz, t, n, p, ns, 11)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let wy = uni(&[bsz, t, n, p], -1.0, 1.0, &mut rng)?;
    let wh = uni(&[bsz, n, p, ns], -1.0, 1.0, &mut rng)?;
    let vars: Vec<Var> = [&r.x, &r.dt, &r.a, &r.b, &r.c, &r.d, &r.h0]
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<candle_core::Result<_>>()?;
    let run = |chunk: Option<usize>| -> Result<GradStore> {
        let inp = ScanInputs {
            x: vars[0].as_tensor(),
            dt: vars[1].as_tensor(),
            a: vars[2].as_tensor(),
            b: vars[3].as_tensor(),
            c: vars[4].as_tensor(),
            d: vars[5].as_tensor(),
            h0: Some(vars[6].as_tensor()),
        };
        let (y, h) = match chunk {
            Some(c) => scan_chunked(&inp, c)?,
            None => scan_reference(&inp)?,
        };
        let loss = ((y * &wy)?.sum_all()? + (h * &wh)?.sum_all()?)?;
        Ok(loss.backward()?)
    };
    let g_ref = run(None)?;
    let names = ["x", "dt", "A", "B", "C", "D", "h0"];
    for chunk in [4usize, 8, 64] {
        let g = run(Some(chunk))?;
        for (name, v) in names.iter().zip(&vars) {
            let a = g.get(v).context("no gradient")?;
            let b = g_ref.get(v).context("no reference gradient")?;
            let (m, mean) = max_abs(a, b)?;
            let rel = m / max_abs_val(b)?;
            println!("chunk {chunk:2} d/d{name:2}: max abs {m:.2e} mean {mean:.2e} rel {rel:.2e}");
            assert!(
                rel <= 1e-4,
                "chunk {chunk} d/d{name}: relative error {rel:e}"
            );
        }
    }
    Ok(())
}

fn sum_sq(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_all()?)
}

#[test]
fn forward_seq_gradients_match_reference_scan_and_finite_differences() -> Result<()> {
    let mixer = tiny_mixer(3)?;
    let opts = ForwardOptions {
        differentiable: true,
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let u = uni(&[2, 13, 10], -1.0, 1.0, &mut rng)?;
    // Autograd through both scans.
    let (tm, vars) = mixer.trainable()?;
    let grads = |scan: Scan| -> Result<GradStore> {
        let (y, _) = tm.forward_seq_scan(&u, None, &opts, scan)?;
        Ok(sum_sq(&y)?.backward()?)
    };
    let g_ref = grads(Scan::Reference)?;
    let g_chk = grads(Scan::Chunked { chunk: 4 })?;
    let g_fus = grads(Scan::Fused)?;
    for (name, v) in &vars {
        for (what, g) in [("chunked", &g_chk), ("fused", &g_fus)] {
            let (a, b) = (g.get(v).context("grad")?, g_ref.get(v).context("grad")?);
            let (m, _) = max_abs(a, b)?;
            let rel = m / max_abs_val(b)?.max(1e-12);
            println!("forward_seq d/d{name}: {what} vs reference rel {rel:.2e}");
            assert!(rel <= 1e-4, "{what} {name}: {rel:e}");
        }
    }

    // Finite differences in f64 on selected entries.
    let m64 = mixer.to_dtype(DType::F64)?;
    let u64_ = u.to_dtype(DType::F64)?;
    let (tm64, vars64) = m64.trainable()?;
    let fd_scan = Scan::Chunked { chunk: 4 };
    let (y, _) = tm64.forward_seq_scan(&u64_, None, &opts, fd_scan)?;
    let g = sum_sq(&y)?.backward()?;
    let loss_of = |params: Vec<Tensor>| -> Result<f64> {
        let m = MambaMixer::from_params(&m64.cfg, params)?;
        let (y, _) = m.forward_seq_scan(&u64_, None, &opts, fd_scan)?;
        Ok(sum_sq(&y)?.to_scalar::<f64>()?)
    };
    // (parameter index, flat element index)
    let probes = [
        (7usize, 0usize),
        (7, 3),
        (6, 1),
        (0, 0),
        (0, 17),
        (3, 2 * 4 + 3),
        (3, 5 * 4 + 1),
    ];
    for (pi, ei) in probes {
        let base: Vec<Tensor> = m64.params().iter().map(|t| (*t).clone()).collect();
        let shape = base[pi].dims().to_vec();
        let flat = base[pi].flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-5;
        let perturbed = |delta: f64| -> Result<f64> {
            let mut f = flat.clone();
            f[ei] += delta;
            let mut ps = base.clone();
            ps[pi] = Tensor::from_vec(f, shape.as_slice(), &Device::Cpu)?;
            loss_of(ps)
        };
        let fd = (perturbed(eps)? - perturbed(-eps)?) / (2.0 * eps);
        let ad = g
            .get(&vars64[pi].1)
            .context("grad")?
            .flatten_all()?
            .to_vec1::<f64>()?[ei];
        let rel = (fd - ad).abs() / fd.abs().max(ad.abs()).max(1e-8);
        println!(
            "FD {}[{ei}]: finite diff {fd:.8e} autograd {ad:.8e} rel {rel:.2e}",
            PARAM_NAMES[pi]
        );
        assert!(
            rel <= 1e-5,
            "{}[{ei}]: fd {fd} vs autograd {ad}",
            PARAM_NAMES[pi]
        );
    }
    Ok(())
}

#[test]
fn forward_seq_state_matches_steps_and_pieces() -> Result<()> {
    let mixer = tiny_mixer(9)?;
    let opts = ForwardOptions::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let (bsz, t) = (2, 19);
    let u = uni(&[bsz, t, 10], -1.0, 1.0, &mut rng)?;
    let (y, st) = mixer.forward_seq(&u, None, &opts)?;
    let mut s = mixer.new_state(bsz, &Device::Cpu)?;
    let mut ys = vec![];
    for i in 0..t {
        let ui = u.narrow(1, i, 1)?; // (bsz, 1, d)
        let yi = if i % 2 == 0 {
            mixer.step(&ui, &mut s)?
        } else {
            mixer.step(&ui.squeeze(1)?, &mut s)?.unsqueeze(1)?
        };
        ys.push(yi);
    }
    let y_steps = Tensor::cat(&ys, 1)?;
    let (ye, _) = max_abs(&y, &y_steps)?;
    let (ce, _) = max_abs(&st.conv, &s.conv)?;
    let (he, _) = max_abs(&st.ssm, &s.ssm)?;
    println!("forward_seq vs step: y {ye:.2e} conv {ce:.2e} ssm {he:.2e}");
    assert!(ye <= 1e-5 && ce <= 1e-5 && he <= 1e-5);

    // Two pieces with the state passed equal one piece, for several split points.
    for split in [1usize, 3, 8, 12] {
        let (y1, s1) = mixer.forward_seq(&u.narrow(1, 0, split)?, None, &opts)?;
        let (y2, s2) = mixer.forward_seq(&u.narrow(1, split, t - split)?, Some(&s1), &opts)?;
        let y12 = Tensor::cat(&[y1, y2], 1)?;
        let (ye, _) = max_abs(&y, &y12)?;
        let (ce, _) = max_abs(&st.conv, &s2.conv)?;
        let (he, _) = max_abs(&st.ssm, &s2.ssm)?;
        println!("split at {split}: y {ye:.2e} conv {ce:.2e} ssm {he:.2e}");
        assert!(ye <= 1e-5 && ce <= 1e-5 && he <= 1e-5);
    }
    // The differentiable and fast norm paths agree.
    let (yd, _) = mixer.forward_seq(
        &u,
        None,
        &ForwardOptions {
            differentiable: true,
            ..Default::default()
        },
    )?;
    let (e, _) = max_abs(&y, &yd)?;
    assert!(e <= 1e-5, "{e}");
    Ok(())
}

#[test]
fn every_parameter_gets_a_gradient() -> Result<()> {
    let opts = ForwardOptions {
        differentiable: true,
        ..Default::default()
    };
    let cfg = tiny_cfg();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let u = uni(&[2, 11, 10], -1.0, 1.0, &mut rng)?;
    let r = uni(&[2, 11, cfg.n_heads() * cfg.head_dim], -1.0, 1.0, &mut rng)?;
    let n = cfg.n_heads();
    let src = AttnSource {
        q_rows: uni(&[n * 4, 10], -0.5, 0.5, &mut rng)?,
        k_rows: uni(&[2 * 4, 10], -0.5, 0.5, &mut rng)?,
        v_rows: uni(&[2 * 4, 10], -0.5, 0.5, &mut rng)?,
        q_bias: None,
        k_bias: None,
        v_bias: None,
        distance: vec![3.0, 10.0, 0.5, 40.0],
        output_rms: vec![0.3, 1.0, 2.0, 0.7],
    };
    let attn_cfg = MambaConfig {
        state_size: 4,
        ..cfg
    };
    for (what, mixer) in [
        ("random", MambaMixer::init_random(&cfg, 1, &Device::Cpu)?),
        (
            "attention",
            MambaMixer::init_from_attention(&src, &attn_cfg)?,
        ),
    ] {
        let (tm, vars) = mixer.trainable()?;
        let (y, _) = tm.forward_seq(&u, None, &opts)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        for (name, v) in &vars {
            let gv = g
                .get(v)
                .with_context(|| format!("{what}: {name} got no gradient"))?;
            let m = max_abs_val(gv)?;
            println!("{what} init: |d/d{name}| max {m:.2e}");
            assert!(m > 0.0 && m.is_finite(), "{what}: {name} gradient {m}");
        }
    }
    Ok(())
}

#[test]
fn state_bytes_match_formula_and_tensors() -> Result<()> {
    for cfg in [
        tiny_cfg(),
        MambaConfig {
            n_groups: 1,
            group_size: 3,
            head_dim: 64,
            state_size: 64,
            conv_kernel: 4,
            d_model: 576,
        },
    ] {
        let m = MambaMixer::init_random(&cfg, 0, &Device::Cpu)?;
        for batch in [1usize, 3] {
            let st = m.new_state(batch, &Device::Cpu)?;
            let (g, gg, p, ns, k) = (
                cfg.group_size,
                cfg.n_groups,
                cfg.head_dim,
                cfg.state_size,
                cfg.conv_kernel,
            );
            let formula =
                batch * (g * gg * p * ns * 4 + (gg * p + gg * ns + g * gg * ns) * (k - 1) * 4);
            assert_eq!(cfg.state_bytes(batch), formula);
            assert_eq!(st.bytes(), formula);
            assert_eq!(
                cfg.state_bytes(1),
                gg * crate::model::plan::mixer_state_bytes(g, p, ns, k)
            );
        }
    }
    assert_eq!(
        MambaConfig {
            n_groups: 1,
            group_size: 3,
            head_dim: 64,
            state_size: 64,
            conv_kernel: 4,
            d_model: 576
        }
        .state_bytes(1),
        52_992
    );
    Ok(())
}

#[test]
fn load_checks_shapes_and_round_trips() -> Result<()> {
    let m = tiny_mixer(41)?;
    let prefix = "model.layers.2.mixer";
    let mut map: std::collections::HashMap<String, Tensor> =
        m.tensors(prefix).into_iter().collect();
    let w = Weights::new(map.clone(), Default::default());
    let back = MambaMixer::load(&w, prefix, &m.cfg)?;
    w.finish()?;
    for (a, b) in m.params().iter().zip(back.params()) {
        assert_eq!(max_abs(a, b)?.0, 0.0);
    }
    map.insert(
        format!("{prefix}.A_log"),
        Tensor::zeros(5, DType::F32, &Device::Cpu)?,
    );
    let err = MambaMixer::load(&Weights::new(map, Default::default()), prefix, &m.cfg).unwrap_err();
    assert!(err.to_string().contains("A_log"), "{err}");
    Ok(())
}

/// Timing at SmolLM2-like sizes (d=576, G=1, g=3, P=N=64). Not a test of speed:
/// `cargo test --release --lib mamba::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() -> Result<()> {
    let cfg = MambaConfig {
        n_groups: 1,
        group_size: 3,
        head_dim: 64,
        state_size: 64,
        conv_kernel: 4,
        d_model: 576,
    };
    let m = MambaMixer::init_random(&cfg, 0, &Device::Cpu)?;
    let (tm, vars) = m.trainable()?;
    let opts = ForwardOptions {
        differentiable: true,
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for t in [256usize, 1024, 4096] {
        let u = uni(&[1, t, 576], -1.0, 1.0, &mut rng)?;
        let scans: &[Scan] = if t <= 1024 {
            &[
                Scan::Fused,
                Scan::Chunked { chunk: 64 },
                Scan::Chunked { chunk: 32 },
                Scan::Chunked { chunk: 128 },
                Scan::Reference,
            ]
        } else {
            &[Scan::Fused, Scan::Chunked { chunk: 64 }]
        };
        for &scan in scans {
            let reps = 3;
            let mut fwd = f64::MAX;
            let mut fb = f64::MAX;
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                let (y, _) = m.forward_seq_scan(&u, None, &ForwardOptions::default(), scan)?;
                let _ = y.sum_all()?.to_scalar::<f32>()?;
                fwd = fwd.min(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                let (y, _) = tm.forward_seq_scan(&u, None, &opts, scan)?;
                let g = y.sqr()?.sum_all()?.backward()?;
                let _ = g.get(&vars[0].1);
                fb = fb.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "t={t:5} {scan:?}: forward {:.1} ms, forward+backward {:.1} ms",
                fwd * 1e3,
                fb * 1e3
            );
        }
        // Decode step.
        let mut st = m.new_state(1, &Device::Cpu)?;
        let u1 = u.narrow(1, 0, 1)?;
        let t0 = std::time::Instant::now();
        for _ in 0..100 {
            let _ = m.step(&u1, &mut st)?;
        }
        println!("step: {:.3} ms", t0.elapsed().as_secs_f64() * 10.0);
    }
    Ok(())
}

/// The default model's mixer sizes (2 of 3 KV groups replaced, 3 query heads a group, P = N = 64,
/// d = 576), and one whose state size is not a multiple of the kernel's 16 lanes.
fn step_test_cfgs() -> Vec<MambaConfig> {
    let real = MambaConfig {
        n_groups: 2,
        group_size: 3,
        head_dim: 64,
        state_size: 64,
        conv_kernel: 4,
        d_model: 576,
    };
    vec![
        tiny_cfg(),
        real,
        MambaConfig {
            n_groups: 1,
            state_size: 20,
            head_dim: 8,
            d_model: 64,
            ..real
        },
    ]
}

#[test]
fn step_kernel_matches_the_candle_step_on_every_instruction_set() -> Result<()> {
    use crate::model::kernels::simd::Isa;
    for (ci, cfg) in step_test_cfgs().iter().enumerate() {
        let mixer = generic_mixer(cfg, 40 + ci as u64)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(50 + ci as u64);
        let (bsz, pre, t) = (2, 5, 11);
        let u = uni(&[bsz, t, cfg.d_model], -1.0, 1.0, &mut rng)?;
        // A state that is not zero: a prefill of `pre` tokens.
        let (_, s0) = mixer.forward_seq(&u.narrow(1, 0, pre)?, None, &ForwardOptions::default())?;
        let s0_ssm = s0.ssm.flatten_all()?.to_vec1::<f32>()?;
        for isa in Isa::available() {
            let (mut sr, mut sk) = (s0.clone(), s0.clone());
            let mut worst = 0f64;
            for i in pre..t {
                let ui = u.narrow(1, i, 1)?; // (bsz, 1, d)
                let yr = mixer.step_reference(&ui, &mut sr)?;
                // Both input ranks.
                let yk = if i % 2 == 0 {
                    mixer.step_kernel(isa, &ui, &mut sk)?
                } else {
                    mixer
                        .step_kernel(isa, &ui.squeeze(1)?, &mut sk)?
                        .unsqueeze(1)?
                };
                assert_eq!(yr.dims(), yk.dims());
                // Outputs are rmsnorm'd (O(1) times the norm weight); each is a ratio of 64-term
                // f32 sums formed in another order than candle's (at most ~64 ulp, 4e-6
                // relative), so 1e-5 relative to the largest value.
                for (what, a, b) in [
                    ("y", &yr, &yk),
                    ("conv", &sr.conv, &sk.conv),
                    ("ssm", &sr.ssm, &sk.ssm),
                ] {
                    let (e, _) = max_abs(a, b)?;
                    let scale = max_abs_val(a)?.max(1.0);
                    worst = worst.max(e / scale);
                    assert!(
                        e <= 1e-5 * scale,
                        "{cfg:?} {isa:?} token {i}: {what} differs by {e:.2e} (scale {scale:.2})"
                    );
                }
            }
            println!("{cfg:?} {isa:?}: worst relative difference {worst:.2e}");
        }
        // The kernel wrote new tensors: the state it started from (which a forked cache may
        // share) is untouched.
        assert_eq!(s0.ssm.flatten_all()?.to_vec1::<f32>()?, s0_ssm);
        // `step` runs the kernel here (f32 on the CPU).
        let mut sa = s0.clone();
        let mut sb = s0.clone();
        let ui = u.narrow(1, pre, 1)?;
        let ya = mixer.step(&ui, &mut sa)?;
        let yb = mixer.step_kernel(Isa::detect(), &ui, &mut sb)?;
        assert_eq!(max_abs(&ya, &yb)?.0, 0.0);
    }
    Ok(())
}

#[test]
fn quantised_step_projections_stay_within_q8_0_error_and_decode_like_prefill() -> Result<()> {
    let cfg = step_test_cfgs()[1];
    let mixer = generic_mixer(&cfg, 60)?;
    let mut q = mixer.clone();
    assert!(q.quantize(candle_core::quantized::GgmlDType::Q8_0)?);
    // The checkpoint's tensors are the f32 ones, untouched.
    for ((na, a), (_, b)) in mixer.tensors("m").iter().zip(q.tensors("m")) {
        assert_eq!(max_abs(a, &b)?.0, 0.0, "{na}");
    }
    // A hidden size that is not a multiple of the block leaves the mixer in f32.
    let mut tiny = tiny_mixer(61)?;
    assert!(!tiny.quantize(candle_core::quantized::GgmlDType::Q8_0)?);
    assert!(tiny.step_proj.is_none());

    let mut rng = rand::rngs::StdRng::seed_from_u64(62);
    let (bsz, t) = (2, 9);
    let u = uni(&[bsz, t, cfg.d_model], -1.0, 1.0, &mut rng)?;
    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let e = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        let n = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        Ok((e / n) as f64)
    };
    // Each projection against f32: the q8_0 bound of tests/quant.rs (2 %, weights and activations
    // rounded to 8 bits).
    let (x32, dt32, z32) = mixer.seq_projections(&u)?;
    let (xq, dtq, zq) = q.seq_projections(&u)?;
    for (what, a, b) in [("xBC", &x32, &xq), ("dt", &dt32, &dtq), ("z", &z32, &zq)] {
        let e = rel(a, b)?;
        println!("q8_0 {what}: relative error {e:.4}");
        assert!(e > 0.0 && e < 0.02, "{what}: {e}");
    }
    // Cached decode = full forward with the quantised projections: prefill and steps read the same
    // quantised matrix, so only the scan's summation order differs (1e-5 as above).
    let opts = ForwardOptions::default();
    let (y_full, _) = q.forward_seq(&u, None, &opts)?;
    let (y_pre, mut st) = q.forward_seq(&u.narrow(1, 0, 4)?, None, &opts)?;
    let mut ys = vec![y_pre];
    for i in 4..t {
        ys.push(q.step(&u.narrow(1, i, 1)?, &mut st)?);
    }
    let (e, _) = max_abs(&y_full, &Tensor::cat(&ys, 1)?)?;
    let scale = max_abs_val(&y_full)?.max(1.0);
    println!("quantised mixer: cached vs full {e:.2e} (scale {scale:.2})");
    assert!(e <= 1e-5 * scale, "{e}");
    Ok(())
}
