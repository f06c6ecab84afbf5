fn main() { println!("cpu {}", vmtask_percpu::cpu()); }
