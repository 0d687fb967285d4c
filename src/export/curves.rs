//! Adversarial loss and perturbation norms over craft steps: a CSV and a small SVG chart.

use crate::craft::report::StepReport;

pub fn csv(history: &[StepReport]) -> String {
    let mut s = String::from("step,adv_loss,linf,mean_l2,delta_linf,grid_l2,frac_at_bound,outer_lr,inner_lr,unroll_steps,seconds,target_fooled\n");
    for r in history {
        let fooled = r.target_fooled.iter().sum::<f64>() / r.target_fooled.len().max(1) as f64;
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{},{:.3},{}\n",
            r.step,
            r.adv_loss.map(|v| v.to_string()).unwrap_or_default(),
            r.norms.linf,
            r.norms.mean_l2,
            r.norms.delta_linf,
            r.norms.grid_l2,
            r.norms.frac_at_bound,
            r.outer_lr,
            r.inner_lr,
            r.unroll_steps,
            r.seconds,
            fooled
        );
    }
    s
}

/// One row per surrogate and craft step: its epoch, the craft step at which that instance was
/// initialised (`step - epoch`; negative for one pretrained before step 0) and its adversarial
/// loss (empty when it took no meta step). This is what separates a surrogate's age from its
/// identity: whether poisons fool old surrogates, or only the instances they were crafted on.
pub fn surrogates_csv(history: &[StepReport]) -> String {
    let mut s = String::from("step,surrogate,epoch,born_step,adv_loss\n");
    for r in history {
        for (m, &epoch) in r.epochs.iter().enumerate() {
            let loss = r.adv_loss_per_surrogate.get(m).copied().flatten();
            s += &format!(
                "{},{},{},{},{}\n",
                r.step,
                m,
                epoch,
                r.step as i64 - epoch as i64,
                loss.map(|v| v.to_string()).unwrap_or_default()
            );
        }
    }
    s
}

fn polyline(points: &[(f64, f64)], x0: f64, y0: f64, w: f64, h: f64, colour: &str) -> String {
    if points.is_empty() {
        return String::new();
    }
    let (xmin, xmax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (ymin, ymax) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let sx = if xmax > xmin { w / (xmax - xmin) } else { 0.0 };
    let sy = if ymax > ymin { h / (ymax - ymin) } else { 0.0 };
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!(
                "{:.1},{:.1}",
                x0 + (x - xmin) * sx,
                y0 + h - (y - ymin) * sy
            )
        })
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{x0}\" y=\"{:.1}\" font-size=\"10\">{ymax:.3}</text>\n<text x=\"{x0}\" y=\"{:.1}\" font-size=\"10\">{ymin:.3}</text>\n",
        pts.join(" "),
        y0 + 10.0,
        y0 + h
    )
}

/// Two panels: adversarial loss (top) and the L-inf / mean-L2 norms (bottom), against step.
pub fn svg(history: &[StepReport]) -> String {
    let loss: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| r.adv_loss.map(|v| (r.step as f64, v)))
        .collect();
    let l2: Vec<(f64, f64)> = history
        .iter()
        .map(|r| (r.step as f64, r.norms.mean_l2))
        .collect();
    let linf: Vec<(f64, f64)> = history
        .iter()
        .map(|r| (r.step as f64, r.norms.linf))
        .collect();
    let mut s = String::from("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"420\" font-family=\"sans-serif\">\n<rect width=\"640\" height=\"420\" fill=\"white\"/>\n");
    s += "<text x=\"60\" y=\"20\" font-size=\"13\">adversarial loss (mean over surrogates) vs craft step</text>\n";
    s += &polyline(&loss, 60.0, 30.0, 560.0, 160.0, "#c0392b");
    s += "<text x=\"60\" y=\"230\" font-size=\"13\">perturbation: mean L2 (blue), L-inf (green), 0-255 scale</text>\n";
    s += &polyline(&l2, 60.0, 240.0, 560.0, 160.0, "#2e86c1");
    s += &polyline(&linf, 60.0, 240.0, 560.0, 160.0, "#229954");
    s += "</svg>\n";
    s
}
