//! Times the prefill q8_0 GEMM (`kernels::q8_gemm`) on each instruction set this CPU has against
//! candle's quantised matmul, on SmolLM2-135M's matrix shapes, alternating the paths so that a
//! shared machine's load hits all alike; CPU time of the process (getrusage), medians over the
//! repeats. Run with one thread: `RAYON_NUM_THREADS=1 cargo run --release --example
//! q8_gemm_timing -- [ROWS] [REPS]` (default 512 rows, 7 repeats).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use recurformer::model::kernels::q8_gemm::{q8_0_gemm_on, GemmIsa};

fn cpu_s() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).map_or(Ok(512), |s| s.parse())?;
    let reps: usize = args.get(2).map_or(Ok(7), |s| s.parse())?;
    let dev = Device::Cpu;
    // (name, n, k): q and o (576 x 576), k / v (192), gate / up (1536), a mixer's stacked
    // projections (the 50 % RecurFormer: 3 heads of 64 -> x 64 + B 64 + C 192 + dt 3 + z 192).
    let shapes = [
        ("q_proj / o_proj", 576, 576),
        ("k_proj / v_proj", 192, 576),
        ("gate / up", 1536, 576),
        ("mixer stacked", 515, 576),
    ];
    let isas = GemmIsa::available();
    let (mut tot_candle, mut tot_best) = (0.0, 0.0);
    for (name, n, k) in shapes {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let q = QMatMul::from_arc(std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let want = q.forward(&x)?;
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); isas.len() + 1];
        for _ in 0..reps {
            let t = cpu_s();
            q.forward(&x)?;
            times[0].push(cpu_s() - t);
            for (i, &isa) in isas.iter().enumerate() {
                let t = cpu_s();
                q8_0_gemm_on(isa, &q, &x)?.expect("applies");
                times[i + 1].push(cpu_s() - t);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let candle = med(&mut times[0]);
        print!(
            "{name} ({m} x {k}) x ({k} x {n}): candle {:.2} ms",
            candle * 1e3
        );
        let mut best = candle;
        for (i, &isa) in isas.iter().enumerate() {
            let t = med(&mut times[i + 1]);
            best = best.min(t);
            let y = q8_0_gemm_on(isa, &q, &x)?.expect("applies");
            let rel = ((&y - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
            .sqrt();
            print!(
                ", {isa:?} {:.2} ms ({:.2}x, rel. diff {rel:.1e})",
                t * 1e3,
                candle / t
            );
        }
        println!();
        tot_candle += candle;
        tot_best += best;
    }
    println!(
        "sum: candle {:.1} ms, best {:.1} ms ({:.2}x)",
        tot_candle * 1e3,
        tot_best * 1e3,
        tot_candle / tot_best
    );
    Ok(())
}
