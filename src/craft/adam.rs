//! Adam on the perturbation parameters (the authors' outer optimiser), with its state kept as
//! plain tensors so it can be checkpointed.

use tch::Tensor;

#[derive(Debug)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken (for bias correction).
    pub t: i64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl Adam {
    /// State for parameters shaped like `params`; TensorFlow's defaults (beta1 0.9, beta2 0.999,
    /// epsilon 1e-8).
    pub fn new(params: &[&Tensor]) -> Adam {
        Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: params.iter().map(|p| p.detach().zeros_like()).collect(),
            v: params.iter().map(|p| p.detach().zeros_like()).collect(),
        }
    }

    /// One step: params -= lr * m_hat / (sqrt(v_hat) + eps).
    pub fn step(&mut self, params: &mut [&mut Tensor], grads: &[Tensor], lr: f64) {
        let lrs = vec![lr; params.len()];
        self.step_each(params, grads, &lrs);
    }

    /// `step` with a rate per parameter.
    pub fn step_each(&mut self, params: &mut [&mut Tensor], grads: &[Tensor], lrs: &[f64]) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let m = &self.m[i] * self.beta1 + g * (1.0 - self.beta1);
            let v = &self.v[i] * self.beta2 + g.square() * (1.0 - self.beta2);
            let update = (&m / bc1) / ((&v / bc2).sqrt() + self.eps) * lrs[i];
            let _ = p.f_sub_(&update).expect("adam update");
            self.m[i] = m;
            self.v[i] = v;
        }
    }
}
