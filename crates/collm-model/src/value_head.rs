//! A scalar value head on a causal LM's hidden state, so the LM can serve as a critic.

use crate::model::{normal, Param};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueHeadKind {
    /// hidden → 1.
    Linear,
    /// hidden → hidden, tanh, hidden → 1.
    Mlp,
}

pub struct ValueHead {
    pub kind: ValueHeadKind,
    pub params: BTreeMap<String, Param>,
}

impl ValueHead {
    /// Weights ~ N(0, 0.02), biases 0.
    pub fn new(kind: ValueHeadKind, hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut mk = |shape: Vec<usize>, zero: bool| -> Result<Param> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if zero { vec![0.0; n] } else { (0..n).map(|_| normal(&mut rng) * 0.02).collect() };
            Ok(Param { var: Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?, trainable: true })
        };
        let mut params = BTreeMap::new();
        match kind {
            ValueHeadKind::Linear => {
                params.insert("v_head.out.weight".into(), mk(vec![1, hidden], false)?);
                params.insert("v_head.out.bias".into(), mk(vec![1], true)?);
            }
            ValueHeadKind::Mlp => {
                params.insert("v_head.hidden.weight".into(), mk(vec![hidden, hidden], false)?);
                params.insert("v_head.hidden.bias".into(), mk(vec![hidden], true)?);
                params.insert("v_head.out.weight".into(), mk(vec![1, hidden], false)?);
                params.insert("v_head.out.bias".into(), mk(vec![1], true)?);
            }
        }
        Ok(Self { kind, params })
    }

    fn w(&self, name: &str, grad: bool) -> Tensor {
        let p = &self.params[name];
        if grad {
            p.var.as_tensor().clone()
        } else {
            p.var.as_detached_tensor()
        }
    }

    /// Values for hidden rows [n, hidden] → [n].
    pub fn forward(&self, h: &Tensor, grad: bool) -> Result<Tensor> {
        if h.rank() != 2 {
            bail!("value head expects [rows, hidden], got {:?}", h.dims());
        }
        // In f32 whatever the backbone's dtype.
        let mut x = h.to_dtype(candle_core::DType::F32)?;
        if self.kind == ValueHeadKind::Mlp {
            x = crate::ops::linear_nt(&x, &self.w("v_head.hidden.weight", grad))?
                .broadcast_add(&self.w("v_head.hidden.bias", grad))?
                .tanh()?;
        }
        let v = crate::ops::linear_nt(&x, &self.w("v_head.out.weight", grad))?.broadcast_add(&self.w("v_head.out.bias", grad))?;
        Ok(v.squeeze(1)?)
    }

    pub fn trainable(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.params.iter().map(|(n, p)| (n, &p.var))
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().map(|(n, p)| (n.clone(), p.var.as_detached_tensor())).collect()
    }
}
